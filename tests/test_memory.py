"""The kernel contract: nothing of size N x V; peak extra memory O(C V + V H + N H); 64-bit offsets."""
import pytest
import torch

import srpo_kernels as sk
from benchmarks.peak_memory import measure

from cases import max_rel_err


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_peak_extra_memory_is_far_below_materialising(backend):
    """Every backend keeps the O(C V) contract, the tensor-op one too (it sizes its chunk to its temporaries)."""
    n, h, v = 2048, 256, 151_936
    fused = measure("fused", n, h, v, backend=backend)
    logits_bytes = n * v * 4
    # Issue bound: below N*V*4/2 bytes. The fp32 dW accumulator alone is V*H*4 (155 MB here).
    assert fused["peak_extra_bytes"] < logits_bytes / 2, fused


@pytest.mark.parametrize("policy", ["low", "fp32"])
def test_bf16_weight_is_never_copied_to_fp32_where_the_cpu_has_bf16_gemms(policy):
    """gemm.py: with bf16 GEMMs ("low", forced here whatever this CPU has) the only V x H temporary is the fp32 dW
    accumulator, and the bf16 dW takes over its pages as it is narrowed (gemm.returned_grad); widening ("fp32", for
    CPUs without bf16 units) adds one fp32 copy of W."""
    import os

    n, h, v = 16, 512, 131_072  # few rows: a CPU without bf16 units runs the forced bf16 GEMMs slowly
    env = dict(os.environ, SRPO_KERNELS_CPU_GEMM=policy)
    peak = measure("fused", n, h, v, dtype="bf16", env=env)["peak_extra_bytes"]
    fp32_vh = v * h * 4
    if policy == "low":
        assert peak < 1.1 * fp32_vh + 40 * 2 ** 20, peak  # accumulator + chunk buffers; not + a whole bf16 dW
    else:
        assert peak > 2 * fp32_vh, peak  # the copy is there: the measurement can see it


def test_bf16_peak_is_below_fp32():
    """Issue 10: bf16 inputs need less memory than fp32 ones (half SDPO, bf16 GEMMs forced whatever this CPU has)."""
    import os

    n, h, v = 2048, 256, 151_936
    env = dict(os.environ, SRPO_KERNELS_CPU_GEMM="low")
    bf16 = measure("fused", n, h, v, dtype="bf16", env=env)["peak_extra_bytes"]
    fp32 = measure("fused", n, h, v, dtype="fp32", env=env)["peak_extra_bytes"]
    assert bf16 < fp32, (bf16, fp32)


def test_weight_grad_is_handed_over_not_copied():
    """dW (V x H fp32) dominates this shape: autograd must adopt our accumulator as .grad, not copy it."""
    n, h, v = 64, 512, 131_072
    fused = measure("fused", n, h, v)
    assert fused["peak_extra_bytes"] < 1.5 * v * h * 4, fused


@pytest.mark.slow
def test_reference_needs_several_times_the_logits():
    n, h, v = 2048, 256, 151_936
    ref = measure("reference", n, h, v)
    fused = measure("fused", n, h, v)
    assert ref["peak_extra_bytes"] > 2 * n * v * 4, ref
    assert fused["peak_extra_bytes"] * 10 < ref["peak_extra_bytes"], (fused, ref)
    assert abs(fused["loss"] - ref["loss"]) <= 1e-4 * max(1.0, abs(ref["loss"]))


@pytest.mark.slow
def test_more_than_2_pow_31_logits():
    """N * V > 2^31 (small H): per-token outputs and per-row gradients of rows beyond the 2^31-th logit match."""
    n, h, v = 16_500, 4, 131_072
    assert n * v > 2 ** 31
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g)
    ids = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    route = torch.rand(n, generator=g) < 0.5
    teacher = torch.randn(int(route.sum()), h, generator=g)
    # Fixed normalisers make every row's loss independent of the others, so row subsets can be checked alone.
    opts = dict(reduction="sum", weight_normalizer=0.5, topk=50)
    out = sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, **opts)
    out.loss.backward()
    teacher_row = torch.cumsum(route.long(), 0) - 1
    for rows in (torch.arange(0, 300), torch.arange(n - 300, n)):
        sub_route = route[rows]
        results = {}
        for dtype in (torch.float64, torch.float32):  # exact, and the naive fp32 error on this machine
            h_sub = hidden.detach()[rows].to(dtype).requires_grad_()
            ref = sk.reference.srpo_loss(h_sub, weight.to(dtype), ids[rows], adv[rows].to(dtype), sub_route,
                                         teacher[teacher_row[rows][sub_route]].to(dtype), **opts)
            ref.loss.backward()
            results[dtype] = {"logprobs": ref.logprobs, "divergence": ref.divergence, "dh": h_sub.grad}
        ours = {"logprobs": out.logprobs[rows], "divergence": out.divergence[rows], "dh": hidden.grad[rows]}
        exact, naive = results[torch.float64], results[torch.float32]
        for k, value in ours.items():
            err, naive_err = max_rel_err(value.double(), exact[k]), max_rel_err(naive[k].double(), exact[k])
            assert err <= max(1e-5, 5 * naive_err), f"{k}: {err:.2e} vs naive fp32 {naive_err:.2e}"


def test_measurement_does_not_inherit_the_parent_peak():
    """Linux keeps a parent's ru_maxrss across exec; the measurement must not report it."""
    ballast = torch.ones(200 * 2 ** 20)  # 800 MB resident in this process
    fused = measure("fused", 256, 64, 4096)
    assert fused["peak_extra_bytes"] < 200 * 2 ** 20, fused
    del ballast
