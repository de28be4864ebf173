"""Peak extra memory of one forward+backward, measured in a fresh subprocess (peak RSS minus the RSS once the
inputs exist), so earlier allocations of the calling process cannot hide or inflate it.

Before the baseline the same implementation runs once on a tiny problem: the first call of a kernel touches
library code and JIT buffers (oneDNN's AMX kernels: about 50 MiB on a Sapphire Rapids CPU, much less on an AVX2
EPYC) that do not grow with the problem and would otherwise be counted as its memory. The high-water mark is then
reset, so the peak of building the inputs is not counted either.

``python -m benchmarks.peak_memory --impl fused --n 2048 --h 256 --v 151936`` (from the repository root) prints
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.arguments import positive_int

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """High-water RSS of this process image (``VmHWM``). Not ``ru_maxrss``: Linux carries a parent's peak over
    ``exec`` into it, so a child spawned by a large process would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: best effort


def start_peak() -> int:
    """Restart the RSS high-water mark from the current RSS (Linux) and return that RSS: the baseline of
    ``peak_rss_bytes() - start_peak()``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_bytes()


def random_problem(n: int, h: int, v: int, sd_frac: float = 0.5, seed: int = 0, dtype: str = "fp32"):
    """Benchmark inputs: (hidden, weight, token_ids, advantages, route, teacher_hidden), no grad flags."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dt)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dt)
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    route = torch.rand(n, generator=g) < sd_frac
    return hidden, weight, ids, adv, route, torch.randn(int(route.sum()), h, generator=g).to(dt)


def measure(impl: str, n: int, h: int, v: int, sd_frac: float = 0.5, seed: int = 0, backend: str = "auto",
            dtype: str = "fp32", env=None) -> dict:
    """Run in a fresh interpreter (with `env` if given); returns {"peak_extra_bytes", "seconds", "loss"}."""
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--impl", impl, "--n", str(n), "--h", str(h),
           "--v", str(v), "--sd-frac", str(sd_frac), "--seed", str(seed), "--backend", backend, "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["fused", "reference"], required=True)
    p.add_argument("--n", type=positive_int, required=True)
    p.add_argument("--h", type=positive_int, required=True)
    p.add_argument("--v", type=positive_int, required=True)
    p.add_argument("--sd-frac", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    import srpo_kernels as sk

    if a.impl == "fused" and a.backend in ("auto", "cpu"):
        from srpo_kernels.backends.cpu import load_error

        load_error()  # build/load the kernel before the baseline is taken

    def call(n, h, v):
        hidden, weight, ids, adv, route, teacher = random_problem(n, h, v, a.sd_frac, a.seed, a.dtype)
        hidden.requires_grad_()
        weight.requires_grad_()
        base = start_peak()
        t0 = time.perf_counter()
        if a.impl == "fused":
            out = sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend=a.backend)
        else:
            out = sk.reference.srpo_loss(hidden, weight, ids, adv, route, teacher)
        out.loss.backward()
        return out, base, time.perf_counter() - t0

    call(16, 64, 4096)  # warm-up, see the module's docstring
    sk.release_workspace()  # the measured call allocates its own chunk buffers, as a first call does
    out, base, seconds = call(a.n, a.h, a.v)
    print(json.dumps({"peak_extra_bytes": max(peak_rss_bytes() - base, 0), "seconds": seconds,
                      "loss": float(out.loss.detach())}))


if __name__ == "__main__":
    _main()
