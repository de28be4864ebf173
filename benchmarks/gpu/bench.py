"""GPU benchmark: Triton backend vs the materialising reference vs Liger-Kernel's chunked losses, forward+backward.

On a CUDA machine:  python benchmarks/gpu/bench.py [--dtype bf16] [--shapes 8192x4096x151936 ...]
Times are ``triton.testing.do_bench`` medians (20th/80th percentiles beside them); memory is
``torch.cuda.max_memory_allocated`` above what the inputs hold. Writes ``benchmarks/results/gpu-<gpu>-<date>.md``
and prints the same table. Liger is optional (``pip install liger-kernel``); a variant that runs out of memory is
reported as OOM. Peers run on the routing they cover: Liger GRPO on all-GRPO (loss_type="bnpo", our dual clip off),
Liger JSD on all-SDPO (alpha = beta = 0.5, no entropy weights); their losses are checked against ours first.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

import srpo_kernels as sk

DEFAULT_SHAPES = ["2048x1024x151936", "4096x2048x151936", "8192x4096x151936"]
ROUTINGS = {"grpo": 0.0, "half": 0.5, "sdpo": 1.0}


SEQUENCES = 8  # tokens are B = 8 sequences of N / 8, one advantage each (Liger's GRPO takes them per sequence)


def make_inputs(n, h, v, sd_frac, dtype, device, seed=0):
    if n % SEQUENCES:
        raise ValueError(f"N must be a multiple of {SEQUENCES}, got {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype)
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(SEQUENCES, generator=g).repeat_interleave(n // SEQUENCES).to(device)
    route = (torch.rand(n, generator=g) < sd_frac).to(device) if 0 < sd_frac < 1 else \
        torch.full((n,), sd_frac == 1.0, device=device)
    teacher = torch.randn(int(route.sum()), h, generator=g).to(device, dtype)
    return hidden, weight, ids, adv, route, teacher


def variants(hidden, weight, ids, adv, route, teacher, backend, compiled=True):
    """name -> zero-argument callable returning the loss (leaves: hidden, weight). Options are set so that each
    peer computes the same loss as ours on the routing it supports."""
    all_grpo, all_sdpo = not bool(route.any()), bool(route.all())
    opts = dict(dual_clip=None, entropy_beta=0.0) if (all_grpo or all_sdpo) else {}
    out = {
        f"fused ({backend})": lambda: sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend=backend,
                                                         **opts).loss,
        "reference": lambda: sk.reference.srpo_loss(hidden, weight, ids, adv, route, teacher, **opts).loss,
    }
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
    except ImportError:
        return out
    if all_grpo:
        grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=0.2,
                                        epsilon_high=0.28, compiled=compiled)
        t = ids.numel() // SEQUENCES
        mask = torch.ones_like(ids).view(SEQUENCES, t)
        out["liger GRPO"] = lambda: grpo(hidden.view(SEQUENCES, t, -1), weight, ids.view(SEQUENCES, t), mask,
                                         adv[::t])[0]
    if all_sdpo:
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=compiled)
        out["liger JSD"] = lambda: jsd(hidden, weight, teacher, weight, ids)
    return out


def _main():
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxHxV (default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--out", type=pathlib.Path, default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/bench.py needs a CUDA GPU")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rows = [f"GPU: {gpu}, {a.dtype}, {date}; command: python benchmarks/gpu/bench.py --dtype {a.dtype} "
            f"--shapes {' '.join(a.shapes)}", "",
            "| N x H x V | routing | variant | median ms (p20-p80) | peak extra MB | loss |", "|---|---|---|---|---|---|"]
    for shape in a.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        for routing, frac in ROUTINGS.items():
            inputs = make_inputs(n, h, v, frac, dtype, "cuda")
            hidden, weight = inputs[0].requires_grad_(), inputs[1].requires_grad_()
            for name, loss_fn in variants(*inputs, backend="triton").items():
                def step():
                    loss_fn().backward()
                    hidden.grad = weight.grad = None
                try:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    loss = float(loss_fn().detach())
                    hidden.grad = weight.grad = None
                    step()
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    med, lo, hi = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                    row = f"| {shape} | {routing} | {name} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {peak:.0f} | {loss:.6f} |"
                except torch.cuda.OutOfMemoryError:
                    row = f"| {shape} | {routing} | {name} | OOM | OOM | |"
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                print(row, flush=True)
                rows.append(row)
    out = a.out or pathlib.Path(__file__).resolve().parents[1] / "results" / \
        f"gpu-{gpu.replace(' ', '_')}-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    _main()
