"""chunk_loop.default_chunk_size: the [C, V] buffers of a chunk stay within the budget, the bf16 scratch included."""
import pytest
import torch

from srpo_kernels.chunk_loop import CHUNK_BYTES, CHUNK_BYTES_CUDA, default_chunk_size


@pytest.mark.parametrize("vocab,hidden", [(32_000, 256), (49_152, 576), (151_936, 256), (151_936, 1024)])
@pytest.mark.parametrize("scratch_bytes,temporaries", [(0, 0), (2, 0), (0, 2), (2, 2)])
def test_cpu_chunk_buffers_fit_the_budget(vocab, hidden, scratch_bytes, temporaries):
    rows = default_chunk_size(vocab, hidden, torch.device("cpu"), temporaries, scratch_bytes)
    assert rows % 16 == 0 and 16 <= rows <= max(hidden, 256)
    assert rows * vocab * (4 + scratch_bytes) * (1 + temporaries) <= CHUNK_BYTES
    # and no smaller than the budget needs: 16 more rows would not fit (or the H cap binds)
    assert rows == max(hidden, 256) // 16 * 16 or \
        (rows + 16) * vocab * (4 + scratch_bytes) * (1 + temporaries) > CHUNK_BYTES


def test_cuda_budget_is_the_measured_one():
    assert default_chunk_size(151_936, 4096, torch.device("cuda"), 0, 2) == \
        default_chunk_size(151_936, 4096, torch.device("cuda")) == CHUNK_BYTES_CUDA // (4 * 151_936) // 16 * 16
