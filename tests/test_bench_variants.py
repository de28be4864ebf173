"""Every benchmark variant computes the same loss as ours (peers included, on the routing they cover)."""
import importlib.util

import pytest
import torch

from benchmarks.variants import ROUTINGS, losses, make_inputs


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_variants_agree(routing):
    inputs = make_inputs(40, 16, 301, ROUTINGS[routing])
    values = {name: float(fn()) for name, fn in losses(*inputs, compiled=False).items()}
    ours = values["fused cpu"]
    for name, value in values.items():
        assert abs(value - ours) <= 1e-5 * max(1.0, abs(ours)), values
    # Each installed peer must be among the variants of the routing it covers.
    if importlib.util.find_spec("liger_kernel"):
        assert {"grpo": "liger GRPO", "sdpo": "liger JSD (eager)"}.get(routing, "reference") in values
    if routing == "sdpo" and importlib.util.find_spec("trl"):
        assert "trl SDPO" in values


def test_gpu_script_refuses_without_cuda():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run")
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


def test_report_command_writes_a_table(tmp_path):
    from benchmarks import report

    # fp32 only: the naive bf16 reference takes half a minute here on a CPU without bf16 units
    report.main(["--quick", "--shapes", "small", "--routings", "grpo", "--dtypes", "fp32", "--out", str(tmp_path)])
    (md,) = tmp_path.glob("*.md")
    text = md.read_text()
    assert "| fp32 | small (1024, 256, 32000) | grpo | fused cpu |" in text and "gemm floor" in text
    assert "command: `python -m benchmarks.report --quick" in text
