"""Peak extra memory of one variant's forward+backward, in a fresh process: peak RSS (VmHWM) minus the RSS once
the inputs exist, after a warm-up call on a tiny problem (see benchmarks/peak_memory.py).

``python -m benchmarks.memory --variant "fused cpu" --n 2048 --h 1024 --v 151936 --routing half``"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.arguments import positive_int


def measure(variant: str, n: int, h: int, v: int, routing: str, dtype: str = "fp32") -> int:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--variant", variant, "--n", str(n), "--h", str(h), "--v",
           str(v), "--routing", routing, "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def _main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True)
    p.add_argument("--n", type=positive_int, required=True)
    p.add_argument("--h", type=positive_int, required=True)
    p.add_argument("--v", type=positive_int, required=True)
    p.add_argument("--routing", default="half")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args()
    import torch

    from benchmarks.variants import DTYPES, ROUTINGS, make_inputs, steps
    from srpo_kernels.backends.cpu import load_error
    from benchmarks.peak_memory import peak_rss_bytes, start_peak

    torch.set_num_threads(2)
    load_error()  # load the kernel before the baseline
    steps(make_inputs(64, 64, 4096, ROUTINGS[a.routing], dtype=DTYPES[a.dtype]))[a.variant]()  # warm-up
    run = steps(make_inputs(a.n, a.h, a.v, ROUTINGS[a.routing], dtype=DTYPES[a.dtype]))[a.variant]
    base = start_peak()
    run()
    print(json.dumps({"peak_extra_bytes": max(peak_rss_bytes() - base, 0)}))


if __name__ == "__main__":
    _main()
