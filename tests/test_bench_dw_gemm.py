"""benchmarks/dw_gemm.py: both ways run and report a time (the figures themselves are the benchmark's, not a test's)."""
import pytest
import torch

from benchmarks import dw_gemm
from srpo_kernels.backends import cpu


def test_measure_reports_both_ways():
    if cpu.load_error() is not None or not torch.ops.srpo_kernels.grad_weight_available():
        pytest.skip("needs the C++ kernel and torch's MKL bf16 GEMM")
    times = dw_gemm.measure(5, 24, 203, rounds=1)
    assert set(times) == {"fp32_acc_gemm", "blocks"} and all(t > 0 for t in times.values())
