import math

import pytest

from benchmarks import row_passes
from srpo_kernels.backends import cpu


@pytest.mark.skipif(cpu.load_error() is not None, reason="the C++ backend does not build here")
def test_every_pass_is_timed():
    times = row_passes.measure(vocab=301, rows=3, rounds=2)
    assert list(times) == ["student_stats", "student_grad", "distill_stats", "distill_grad"]
    assert all(math.isfinite(t) and t > 0 for t in times.values())
