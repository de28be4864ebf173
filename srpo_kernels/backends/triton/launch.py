"""How every kernel here is launched: autotuned over block size / warps on a GPU, one fixed configuration under
``TRITON_INTERPRET=1`` (multi-config autotune fails there, and large blocks keep the interpreter fast)."""
from __future__ import annotations

import os

import triton

INTERPRET_BLOCK = 1024
# FP fusion (a * b + c as one FMA) pinned on, the default the kernels were measured with: Triton 3.9 warns on every
# launch that leaves it unset that its default turns off in 3.10, which would change their numerics and speed. No exact
# step relies on a rounded product (TwoSum only adds; logits are loaded, not multiplied, before `z - max`).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)
_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Launcher:
    """``Launcher(kernel, writes=("z_ptr",))(grid, *args, **constexprs)``: one program per row.

    `writes` names the buffers a kernel overwrites in place, restored between autotuning trials."""

    def __init__(self, kernel, writes=()):
        self.kernel = kernel
        self.tuned = None
        if not interpreting():
            self.tuned = triton.autotune(_CONFIGS, key=["n_cols"], restore_value=list(writes))(kernel)

    def __call__(self, rows: int, *args, **constexprs):
        if self.tuned is None:
            self.kernel[(rows,)](*args, BLOCK=INTERPRET_BLOCK, **constexprs)
        else:
            self.tuned[(rows,)](*args, **constexprs, **COMPILE_OPTIONS)
