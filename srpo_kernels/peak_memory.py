"""Peak extra memory of one forward+backward, measured in a fresh subprocess (``ru_maxrss`` minus the RSS once the
inputs exist), so earlier allocations of the calling process cannot hide or inflate it.

``python -m srpo_kernels.peak_memory --impl fused --n 2048 --h 256 --v 151936`` prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(impl: str, n: int, h: int, v: int, sd_frac: float = 0.5, seed: int = 0, backend: str = "auto") -> dict:
    """Run in a fresh interpreter; returns {"peak_extra_bytes", "seconds", "loss"}."""
    cmd = [sys.executable, "-m", "srpo_kernels.peak_memory", "--impl", impl, "--n", str(n), "--h", str(h),
           "--v", str(v), "--sd-frac", str(sd_frac), "--seed", str(seed), "--backend", backend]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["fused", "reference"], required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--h", type=int, required=True)
    p.add_argument("--v", type=int, required=True)
    p.add_argument("--sd-frac", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    a = p.parse_args()
    import torch

    import srpo_kernels as sk

    if a.impl == "fused" and a.backend in ("auto", "cpu"):
        from srpo_kernels.backends.cpu import load_error

        load_error()  # build/load the kernel before the baseline is taken
    g = torch.Generator().manual_seed(a.seed)
    hidden = torch.randn(a.n, a.h, generator=g).requires_grad_()
    weight = (torch.randn(a.v, a.h, generator=g) / a.h ** 0.5).requires_grad_()
    ids = torch.randint(0, a.v, (a.n,), generator=g)
    adv = torch.randn(a.n, generator=g)
    route = torch.rand(a.n, generator=g) < a.sd_frac
    teacher = torch.randn(int(route.sum()), a.h, generator=g)
    base = _rss_bytes()
    t0 = time.perf_counter()
    if a.impl == "fused":
        out = sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend=a.backend)
    else:
        out = sk.reference.srpo_loss(hidden, weight, ids, adv, route, teacher)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_extra_bytes": max(peak - base, 0), "seconds": seconds, "loss": float(out.loss)}))


if __name__ == "__main__":
    _main()
