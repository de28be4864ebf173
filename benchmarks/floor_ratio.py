"""Fused forward+backward vs the GEMM floor and the reference, side by side in one run (fp32, CPU).

``python benchmarks/floor_ratio.py [--n 1024 --h 512 --v 32000 --sd-frac 0.5 --threads 2]``. The floor is the
matmuls alone for the same shapes and routing: student forward, dhidden, dW, and the teacher forward over the SDPO
rows. Times are the best of --repeats runs.
"""
import argparse
import time

import torch

import srpo_kernels as sk
from srpo_kernels.peak_memory import random_problem


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32_000)
    p.add_argument("--sd-frac", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    h, w, ids, adv, route, th = random_problem(a.n, a.h, a.v, a.sd_frac)

    def floor():
        z = h @ w.T
        _ = z @ w, z.T @ h, th @ w.T

    def fused(backend):
        def run():
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            sk.fused_srpo_loss(hh, ww, ids, adv, route, th, backend=backend).loss.backward()
        return run

    def reference():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        sk.reference.srpo_loss(hh, ww, ids, adv, route, th).loss.backward()

    t_floor = best_of(floor, a.repeats)
    print(f"N={a.n} H={a.h} V={a.v} sd_frac={a.sd_frac} threads={a.threads} fp32")
    print(f"{'variant':<22}{'seconds':>10}{'/ floor':>10}")
    print(f"{'GEMM floor':<22}{t_floor:>10.3f}{1.0:>10.2f}")
    for label, fn in (("fused cpu", fused("cpu")), ("fused torch", fused("torch")), ("reference", reference)):
        t = best_of(fn, a.repeats)
        print(f"{label:<22}{t:>10.3f}{t / t_floor:>10.2f}")


if __name__ == "__main__":
    main()
