"""GPU benchmark: Triton backend vs the materialising reference vs Liger-Kernel's chunked losses, forward+backward.

On a CUDA machine:  python benchmarks/gpu/bench.py [--dtype bf16] [--shapes 8192x4096x151936 ...]
Times are ``triton.testing.do_bench`` medians (20th/80th percentiles beside them); memory is
``torch.cuda.max_memory_allocated`` above what the inputs hold. Writes ``benchmarks/results/gpu-<gpu>-<date>.md``
and prints the same table. Liger is optional (``pip install liger-kernel``); a variant that runs out of memory is
reported as OOM. Peers run on the routing they cover: Liger GRPO on all-GRPO (loss_type="bnpo", our dual clip off),
Liger JSD on all-SDPO (alpha = beta = 0.5, no entropy weights); their losses are checked against ours in
tests/test_bench_variants.py. "gemm floor" is the matmuls alone (student forward, dh, dW, teacher forward) in the same
dtype: the time no fused loss can beat.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks.variants import ROUTINGS, make_inputs, steps  # noqa: E402

DEFAULT_SHAPES = ["2048x1024x151936", "4096x2048x151936", "8192x4096x151936"]


def _main():
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxHxV (default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--forward", action="store_true",
                   help="time fused_logprobs(with_entropy=True) under no_grad instead of the loss's fwd+bwd: "
                        "on-chip vs chunked Triton forward vs the materialising reference")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/bench.py needs a CUDA GPU")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    mode = " --forward" if a.forward else ""
    rows = [f"GPU: {gpu}, {a.dtype}, {date}; command: python benchmarks/gpu/bench.py --dtype {a.dtype}{mode} "
            f"--shapes {' '.join(a.shapes)}", "",
            "| N x H x V | routing | variant | median ms (p20-p80) | peak extra MB | loss |", "|---|---|---|---|---|---|"]
    for shape in a.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        for routing, frac in ({"grpo": 0.0} if a.forward else ROUTINGS).items():
            inputs = make_inputs(n, h, v, frac, dtype, "cuda")
            hidden, weight = inputs[0], inputs[1]
            variants = _forward_steps(inputs) if a.forward else steps(inputs, backends=("triton",))
            for name, step in variants.items():
                try:
                    step()  # warm-up: compilation and autotuning (its timing buffers) stay out of the peak
                    hidden.grad = weight.grad = None
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    loss = step()
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    med, lo, hi = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                    shown = "" if loss is None else f"{float(loss):.6f}"
                    row = f"| {shape} | {routing} | {name} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {peak:.0f} | {shown} |"
                except torch.cuda.OutOfMemoryError:
                    row = f"| {shape} | {routing} | {name} | OOM | OOM | |"
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                print(row, flush=True)
                rows.append(row)
    out = a.out or pathlib.Path(__file__).resolve().parents[1] / "results" / \
        f"gpu-{gpu.replace(' ', '_')}{'-forward' if a.forward else ''}-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


def _forward_steps(inputs):
    """name -> no-grad log-probs + entropies of every row; "loss" column: the mean log-prob."""
    import os

    import srpo_kernels as sk

    hidden, weight, ids = (t.detach() for t in inputs[:3])

    def fused(choice):
        def step():
            os.environ["SRPO_KERNELS_TRITON_FORWARD"] = choice
            with torch.no_grad():
                lp, _ = sk.fused_logprobs(hidden, weight, ids, with_entropy=True, backend="triton")
            return lp.mean()
        return step

    def reference():
        with torch.no_grad():
            return sk.reference.logprobs(hidden, weight, ids, with_entropy=True)[0].mean()

    def floor():
        torch.mm(hidden, weight.T, out_dtype=torch.float32) if hidden.dtype != torch.float32 else hidden @ weight.T

    return {"on-chip triton": fused("onchip"), "chunked triton": fused("chunked"), "reference": reference,
            "gemm floor": floor}


if __name__ == "__main__":
    _main()
