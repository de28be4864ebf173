"""Compiles the Triton backend's vocabulary-pass kernels for an H100 (sm_90) without a GPU: the interpreter that runs
them in CI executes Python, so a kernel that does not type-check or lower would only fail on a GPU. Run as a script
(TRITON_INTERPRET unset: under it the kernels are not JIT functions); tests/test_triton.py does. Prints one line per
compiled variant. (linear_stats.py's on-chip kernel, off by default, is not covered.)"""
import importlib
import itertools
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


INTS = {"stride": "i64", "n_cols": "i32"}
# constexpr -> the values each kernel is launched with (BLOCK: the smallest autotune config)
CONSTEXPRS = {"BLOCK": [1024], "MODE": [0, 1, 2], "HAS_ENT": [False, True]}
# module -> kernel (by module path: the package's own names are the launchers, e.g. lse_entropy)
KERNELS = {"lse_entropy": "lse_entropy_kernel", "divergence": "divergence_kernel", "student_grad": "student_grad_kernel",
           "distill_grad": "distill_grad_kernel", "tail_grad": "tail_grad_kernel"}


def variants(kernel):
    """(signature, constexprs) for each combination of the kernel's constexpr values."""
    names = [p.name for p in kernel.params]
    fixed = [n for n in names if n in CONSTEXPRS]
    base = {n: ("*fp32" if n.endswith("_ptr") else INTS.get(n, "fp32")) for n in names if n not in CONSTEXPRS}
    for values in itertools.product(*(CONSTEXPRS[n] for n in fixed)):
        yield {**base, **{n: "constexpr" for n in fixed}}, dict(zip(fixed, values))


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_triton.py: unset TRITON_INTERPRET (under it the kernels are not JIT functions)")
    target = GPUTarget("cuda", 90, 32)
    for module, name in KERNELS.items():
        kernel = getattr(importlib.import_module(f"srpo_kernels.backends.triton.{module}"), name)
        for signature, constexprs in variants(kernel):
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            assert compiled.asm.get("cubin"), name
            print(f"{name} {constexprs}: {len(compiled.asm['cubin'])} bytes of sm_90 code")


if __name__ == "__main__":
    main()
