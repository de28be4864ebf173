"""The README's runnable examples run as written (small sizes)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _readme_programs():
    """The README's complete Python examples (blocks that start with an import; the others are fragments of one)."""
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith(("import ", "from "))]


@pytest.mark.parametrize("program", _readme_programs(), ids=lambda b: b.splitlines()[1][:40])
def test_readme_example_runs_as_written(program, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
