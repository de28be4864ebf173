"""The GPU benchmark's variants compute the same loss (checked here on CPU, tiny shapes, Liger uncompiled)."""
import importlib.util
import pathlib

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gpu_bench", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("routing", list(bench.ROUTINGS))
def test_variants_agree(routing):
    inputs = bench.make_inputs(40, 16, 301, bench.ROUTINGS[routing], torch.float32, "cpu")
    losses = {name: float(fn()) for name, fn in bench.variants(*inputs, backend="cpu", compiled=False).items()}
    ours = losses["fused (cpu)"]
    for name, value in losses.items():
        assert abs(value - ours) <= 1e-5 * max(1.0, abs(ours)), losses
    if importlib.util.find_spec("liger_kernel") is not None and routing != "half":
        assert any(name.startswith("liger") for name in losses)
