"""CPU forward+backward benchmarks, side by side: ``pytest benchmarks --benchmark-only`` (add ``-m "not slow"`` to
skip the Qwen3-sized shape, ``-k fp32`` or ``-k bf16`` for one dtype; each case is its own benchmark group).

``python -m benchmarks.report`` runs the same variants and writes the table, the memory figures and the plots.
"""
import pytest
import torch

from benchmarks.variants import DTYPES, ROUTINGS, SHAPES, make_inputs, steps

VARIANTS = ["gemm floor", "gemm floor, outputs kept", "fused cpu", "fused torch", "reference", "liger GRPO", "liger JSD",
            "liger JSD (eager)", "trl SDPO"]
SHAPE_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name == "qwen3" else name for name in SHAPES]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_backward(benchmark, dtype, shape, routing, variant):
    """Every variant, the GEMM floor included, in the inputs' dtype: bf16 against bf16's own floor."""
    torch.set_num_threads(2)
    run = steps(make_inputs(*SHAPES[shape], ROUTINGS[routing], dtype=DTYPES[dtype])).get(variant)
    if run is None:
        pytest.skip(f"{variant} does not cover routing={routing}")
    benchmark.group = f"{dtype}-{shape}-{routing}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
