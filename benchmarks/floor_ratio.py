"""Fused forward+backward vs the GEMM floor, side by side in one run (CPU): a quick check while tuning.

``python -m benchmarks.floor_ratio --shape small --routing half [--dtype bf16] [--chunk-sizes 128,256,512]
[--rounds 5] [--released-workspace] [--no-grad]``

Variants run interleaved, round after round, and each reports its median over the rounds as a ratio to the
floor's (the matmuls alone for the same shapes, routing and dtype, see benchmarks/variants.py), and to the floor
with its outputs kept between calls ("/ kept": the same GEMMs without the page faults of fresh [N, V] outputs).
``--no-grad`` adds the fused call under ``torch.no_grad()`` (forward only, as an evaluation runs it).
``--chunk-sizes`` adds the fused cpu backend at each given chunk size; that is how the default in
``chunk_loop.default_chunk_size`` was chosen. ``--released-workspace`` adds it with the buffers that
``srpo_kernels/workspace.py`` keeps between calls freed before each call. The full table with peers and memory is
``python -m benchmarks.report``.
"""
import argparse
import statistics
import time

import torch

import srpo_kernels as sk
from benchmarks.arguments import positive_int
from benchmarks.variants import DTYPES, ROUTINGS, SHAPES, make_inputs, peer_matched_options, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--routing", choices=ROUTINGS, default="half")
    p.add_argument("--chunk-sizes", default="", help="comma-separated chunk sizes for extra fused cpu variants")
    p.add_argument("--reference", action="store_true", help="also time the materialising reference")
    p.add_argument("--released-workspace", action="store_true",
                   help="also time the fused cpu backend with its kept chunk buffers freed before each call")
    p.add_argument("--no-grad", action="store_true",
                   help="also time the fused cpu call under torch.no_grad() (evaluation: leaves that require grad, "
                        "no backward)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    inputs = make_inputs(*SHAPES[a.shape], ROUTINGS[a.routing], DTYPES[a.dtype])
    every = steps(inputs, backends=("cpu",), compiled=False)
    variants = {name: every[name] for name in ("gemm floor", "gemm floor, outputs kept", "fused cpu")}
    if a.reference:
        variants["reference"] = every["reference"]
    if a.released_workspace:
        def released(fused=every["fused cpu"]):
            sk.release_workspace()  # as without srpo_kernels/workspace.py: this call maps its buffers afresh
            fused()
        variants["fused cpu, ws released"] = released
    hidden, weight, ids, adv, route, teacher = inputs
    opts = peer_matched_options(route)  # the same loss as the "fused cpu" variant
    if a.no_grad:
        def no_grad():
            with torch.no_grad():
                sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend="cpu", **opts)
        variants["fused cpu, no_grad"] = no_grad
    for size in filter(None, a.chunk_sizes.split(",")):
        def run(size=int(size)):
            sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend="cpu", chunk_size=size,
                               **opts).loss.backward()
            hidden.grad = weight.grad = None
        variants[f"fused cpu, chunk {size}"] = run
    for fn in variants.values():  # warm-up (kernel build, allocator)
        fn()
    times = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["gemm floor"])
    kept = statistics.median(times["gemm floor, outputs kept"])
    print(f"{a.shape} {SHAPES[a.shape]} routing={a.routing} threads={a.threads} {a.dtype}, median of {a.rounds}")
    print(f"{'variant':<26}{'ms':>10}{'/ floor':>10}{'/ kept':>10}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<26}{t * 1e3:>10.1f}{t / floor:>10.3f}{t / kept:>10.3f}")


if __name__ == "__main__":
    main()
