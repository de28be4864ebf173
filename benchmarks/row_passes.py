"""The C++ backend's four row passes alone, in microseconds a row (one thread, bf16 GEMM output read directly).

``python -m benchmarks.row_passes [--vocab 32000] [--rows 16] [--alpha 0.5] [--rounds 40] [--scale 1]``

`--scale` multiplies the random logits: 1 gives flat rows, 4 rows whose top token holds ~0.2 of the mass (the
gradient passes then look for the row's heavy entries, see the kernel's rebalance).

Each pass runs on `--rows` rows of random bf16 logits (16 rows of 32 000 fit in L2, so this times the arithmetic,
not memory) and reports its best of `--rounds` calls. A/B of a kernel change on a noisy 2-core machine: run the two
checkouts at once, one per core, then swapped, e.g.
``taskset -c 0 python -m benchmarks.row_passes & (cd ../base && taskset -c 1 python -m benchmarks.row_passes)``:
both then see the same neighbours, which sequential runs do not.
"""
import argparse
import time

import torch

from srpo_kernels.backends import cpu
from srpo_kernels.backends.row_ops import Widen
from benchmarks.arguments import positive_int


def best_us_per_row(fn, rows: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / rows * 1e6


def measure(vocab: int = 32000, rows: int = 16, alpha: float = 0.5, rounds: int = 40, scale: float = 1.0) -> dict:
    """{pass name: best microseconds a row}; raises RuntimeError where the C++ kernel does not build."""
    if cpu.load_error() is not None:
        raise RuntimeError(f"the C++ backend is not available: {cpu.load_error()}")
    ops = cpu.CpuRowOps()
    g = torch.Generator().manual_seed(0)
    student = (scale * torch.randn(rows, vocab, generator=g)).bfloat16()
    teacher = (scale * torch.randn(rows, vocab, generator=g)).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    u = torch.empty(rows, vocab)
    ones = torch.ones(rows)
    # The gradient passes overwrite their chunk with dL/dz, so each call first restores the logits (a 1 MB copy at
    # the defaults, in both sides of an A/B): where a row's heavy entries are looked for, the cost depends on them.
    # u, which distill_grad only reads, stays as distill_stats left it.
    work = student.clone()

    def fresh(t=None):
        return widen(work.copy_(student), t)

    def widen(z, t=None):
        return Widen(z, t, None, 1.0)

    st = ops.student_stats(None, targets, widen=widen(student))
    dst, ids = ops.distill_stats(None, u, targets, alpha, None, False, widen=widen(student, teacher))
    passes = {
        "student_stats": lambda: ops.student_stats(None, targets, widen=widen(student)),
        "student_grad": lambda: ops.student_grad(None, targets, st, ones, None, widen=fresh()),
        "distill_stats": lambda: ops.distill_stats(None, u, targets, alpha, None, False,
                                                   widen=widen(student, teacher)),
        "distill_grad": lambda: ops.distill_grad(None, u, targets, dst, ids, ones, ones, alpha, None, False,
                                                 widen=fresh(teacher)),
    }
    return {name: best_us_per_row(fn, rows, rounds) for name, fn in passes.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=positive_int, default=32000)
    p.add_argument("--rows", type=positive_int, default=16)
    p.add_argument("--alpha", type=float, default=0.5, help="divergence of the distill passes (0.5: JSD)")
    p.add_argument("--rounds", type=positive_int, default=40)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the logits: larger is sharper")
    a = p.parse_args()
    torch.set_num_threads(1)
    for name, us in measure(a.vocab, a.rows, a.alpha, a.rounds, a.scale).items():
        print(f"{name:<14} {us:8.1f} us/row")


if __name__ == "__main__":
    main()
