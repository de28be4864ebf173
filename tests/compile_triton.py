"""Compiles the Triton backend's vocabulary-pass kernels for an H100 (sm_90) without a GPU: the interpreter that runs
them in CI executes Python, so a kernel that does not type-check or lower would only fail on a GPU. Run as a script
(TRITON_INTERPRET unset: under it the kernels are not JIT functions); tests/test_triton.py does. Prints one line per
compiled variant, linear_stats.py's on-chip GEMM kernel included (bf16 and fp32 operands; the interpreter runs it
only on widened operands, its bf16 tl.dot being wrong there). Each is compiled with the options the launches pin
(launch.COMPILE_OPTIONS), and the divergence kernel once more without FP fusion, to show the pin is what decides."""
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


def linear_stats_variants():
    """linear_stats_kernel as linear_student_stats launches it on a GPU, with the first autotune config."""
    ints = {"n_rows": "i32", "n_cols": "i32", "n_hidden": "i32", "stride_h": "i32", "stride_w": "i32",
            "n_spans": "i32", "cols_per_program": "i32", "inv_t": "fp32"}
    for operand, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for has_bias in (False, True):
            signature = {"h_ptr": f"*{operand}", "w_ptr": f"*{operand}", "b_ptr": "*fp32", "y_ptr": "*i64", **ints,
                         **{n: "*fp32" for n in ("m_ptr", "s_ptr", "t_ptr", "zy_ptr")}}
            constexprs = dict(HAS_BIAS=has_bias, PRECISION=precision, UPCAST=False, GROUP_M=16, BM=128, BN=128,
                              BK=64)
            yield {**signature, **{n: "constexpr" for n in constexprs}}, constexprs


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_triton.py: unset TRITON_INTERPRET (under it the kernels are not JIT functions)")
    from srpo_kernels.backends.triton.launch import COMPILE_OPTIONS

    target = GPUTarget("cuda", 90, 32)
    for module, name in KERNELS.items():
        kernel = getattr(importlib.import_module(f"srpo_kernels.backends.triton.{module}"), name)
        for signature, constexprs in variants(kernel):
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=target, options=COMPILE_OPTIONS)
            assert compiled.asm.get("cubin"), name
            print(f"{name} {constexprs}: {len(compiled.asm['cubin'])} bytes of sm_90 code")
            if name == "divergence_kernel" and constexprs == {"BLOCK": 1024, "MODE": 2}:
                unfused = triton.compile(source, target=target, options={**COMPILE_OPTIONS, "enable_fp_fusion": False})
                print(f"fma.rn.f32 in the JSD divergence kernel: {compiled.asm['ptx'].count('fma.rn.f32')} pinned, "
                      f"{unfused.asm['ptx'].count('fma.rn.f32')} without FP fusion")
    kernel = importlib.import_module("srpo_kernels.backends.triton.linear_stats").linear_stats_kernel
    for signature, constexprs in linear_stats_variants():
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=dict(num_warps=8, num_stages=3, **COMPILE_OPTIONS))
        assert compiled.asm.get("cubin"), "linear_stats_kernel"
        print(f"linear_stats_kernel {constexprs}: {len(compiled.asm['cubin'])} bytes of sm_90 code")


if __name__ == "__main__":
    main()
