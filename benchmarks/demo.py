"""Demonstration: the fused SRPO loss beside the materialising reference on a realistic shape.

``python -m benchmarks.demo [--n 1024 --h 512 --v 151936]`` runs forward+backward of each variant in a fresh
process (half the tokens routed to self-distillation) and prints loss, time and peak extra memory.
"""
from __future__ import annotations

import argparse
import platform

from benchmarks.arguments import positive_int
from benchmarks.peak_memory import measure


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=1024, help="response tokens (default 1024)")
    p.add_argument("--h", type=positive_int, default=512, help="hidden size (default 512)")
    p.add_argument("--v", type=positive_int, default=151_936, help="vocabulary (default 151936, Qwen3's)")
    p.add_argument("--sd-frac", type=float, default=0.5, help="fraction of tokens routed to SDPO (default 0.5)")
    a = p.parse_args(argv)
    logits_gb = a.n * a.v * 4 / 1e9
    print(f"SRPO loss forward+backward, N={a.n} H={a.h} V={a.v}, {a.sd_frac:.0%} SDPO-routed tokens "
          f"({platform.processor() or platform.machine()}); one fp32 [N, V] logits tensor = {logits_gb:.2f} GB")
    rows = []
    for label, impl, backend in (("fused, C++ CPU kernel", "fused", "cpu"),
                                 ("fused, chunked PyTorch", "fused", "torch"),
                                 ("reference (materialising)", "reference", "auto")):
        print(f"  running {label} ...", flush=True)
        rows.append((label, measure(impl, a.n, a.h, a.v, a.sd_frac, backend=backend)))
    ref = rows[-1][1]
    print(f"\n{'variant':<28}{'loss':>12}{'time (s)':>10}{'vs ref':>8}{'peak extra MB':>15}{'vs ref':>8}")
    for label, r in rows:
        print(f"{label:<28}{r['loss']:>12.6f}{r['seconds']:>10.2f}{r['seconds'] / ref['seconds']:>8.2f}"
              f"{r['peak_extra_bytes'] / 2**20:>15.0f}{r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):>8.3f}")


if __name__ == "__main__":
    main()
