"""The CPU's two ways to add a bf16/fp16 chunk's dW into the fp32 accumulator, side by side, in milliseconds.

``python -m benchmarks.dw_gemm [--shapes 256,256,32000 256,576,49152 512,576,49152] [--dtype bf16] [--rounds 10]``

- ``fp32_acc_gemm``: the C++ kernel's grad_weight, MKL's bf16/fp16 GEMM writing into the fp32 accumulator
  (gemm.Gemms.add_grad_weight's choice where torch's CPU build has MKL);
- ``blocks``: gemm.add_grad_weight_blocks, torch's bf16/fp16 GEMM per block of vocabulary rows, each share
  added by the C++ accumulate pass.

Each shape is C (rows of the chunk), H, V; the figure is the best of `--rounds` calls with the threads torch has.
"""
import argparse

import torch

from benchmarks.arguments import positive_int
from benchmarks.row_passes import best_us_per_row
from srpo_kernels import gemm
from srpo_kernels.backends import cpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def best_ms(fn, rounds: int) -> float:
    return best_us_per_row(fn, 1, rounds) / 1e3


def measure(c: int, h_dim: int, v: int, dtype=torch.bfloat16, rounds: int = 10) -> dict:
    """{way: best milliseconds of one acc <- acc + dz^T h}; raises RuntimeError where a way is unavailable."""
    if cpu.load_error() is not None:
        raise RuntimeError(f"the C++ backend is not available: {cpu.load_error()}")
    if not torch.ops.srpo_kernels.grad_weight_available():
        raise RuntimeError("torch's CPU build has no MKL bf16/fp16 GEMM here: only the blocks run")
    g = torch.Generator().manual_seed(0)
    dz = torch.randn(c, v, generator=g).to(dtype)
    h = torch.randn(c, h_dim, generator=g).to(dtype)
    acc = torch.zeros(v, h_dim)
    return {"fp32_acc_gemm": best_ms(lambda: torch.ops.srpo_kernels.grad_weight(acc, dz, h, 1.0), rounds),
            "blocks": best_ms(lambda: gemm.add_grad_weight_blocks(acc, dz, h, 1.0), rounds)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["256,256,32000", "256,576,49152", "512,576,49152"],
                   help="C,H,V of each case")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rounds", type=positive_int, default=10)
    a = p.parse_args()
    print(f"{'C, H, V':<18} {'fp32_acc_gemm ms':>17} {'blocks ms':>10} {'blocks / gemm':>14}  ({a.dtype}, "
          f"{torch.get_num_threads()} threads)")
    for shape in a.shapes:
        c, h_dim, v = (int(x) for x in shape.split(","))
        t = measure(c, h_dim, v, DTYPES[a.dtype], a.rounds)
        print(f"{shape:<18} {t['fp32_acc_gemm']:17.2f} {t['blocks']:10.2f} {t['blocks'] / t['fp32_acc_gemm']:14.2f}")


if __name__ == "__main__":
    main()
