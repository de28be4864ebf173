import os
import sys

# Make the tests' helpers and the benchmarks package importable however pytest is invoked.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The Triton backend is tested on the CPU through Triton's interpreter, which must be chosen before triton is
# imported (nothing imports it earlier: the backend loads it lazily). On a CUDA machine the real kernels run.
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
