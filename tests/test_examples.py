"""The README's runnable examples run as written (small sizes)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vocab_parallel_example_under_torchrun():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "examples/vocab_parallel.py", "--vocab", "3001", "--tokens", "64",
           "--check"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rank 0/2: vocabulary rows 1501" in out.stdout and "rank 1/2: vocabulary rows 1500" in out.stdout
    diffs = re.search(r"logprobs ([\d.e+-]+), dh ([\d.e+-]+), dW block ([\d.e+-]+)", out.stdout)
    assert diffs and all(float(d) < 1e-4 for d in diffs.groups()), out.stdout
