"""The Triton backend against the reference: on CUDA when present, else under TRITON_INTERPRET=1 (see conftest)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import srpo_kernels as sk
from cases import (FAR_APART, assert_agree, assert_fp32_no_worse_than_naive, far_apart_case, fused,
                   low_precision_errors, make_case, max_rel_err, naive_fp32, ref_loss, run)

pytest.importorskip("triton", reason="triton not installed (pip install 'srpo-kernels[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
from srpo_kernels.backends.triton import TritonPasses  # noqa: E402 (needs triton)

CASES = {
    "jsd": {},
    "forward_kl": dict(alpha=0.0),
    "reverse_kl": dict(alpha=1.0),
    "topk_tail": dict(topk=7),
    "topk_renorm_rkl": dict(topk=5, topk_tail=False, alpha=1.0),
    "topk_tail_fkl": dict(topk=9, alpha=0.0),
    "temperature_ref_kl": dict(temperature=0.7, ref_beta=0.05),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none", topk=6),
}


def _on_device(case):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    options = CASES[name]
    # V = 1500: more than one interpreter block (1024) and not a multiple of it.
    case = make_case(seed=len(name), n=29, v=1500, ref=True)
    expected = run(ref_loss, case, **options)
    actual = run(fused("triton", chunk_size=16), _on_device(case), dtype=torch.float32, **options)
    assert_agree({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in actual.items()}, expected,
                 naive=naive_fp32(case, **options))


@pytest.mark.parametrize("variant", [dict(sd_frac=0.0), dict(sd_frac=1.0, bias=False), dict(weight_grad=False),
                                     dict(mask_frac=0.6, old=False)], ids=str)
def test_triton_routing_and_masks(variant):
    case = make_case(seed=5, n=33, v=301, **variant)
    expected = run(ref_loss, case, topk=4)
    actual = run(fused("triton"), _on_device(case), dtype=torch.float32, topk=4)
    assert_agree({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in actual.items()}, expected,
                 naive=naive_fp32(case, topk=4))


def test_triton_bf16_no_worse_than_naive():
    keys = ("loss", "logprobs", "divergence", "grad_hidden", "grad_weight", "grad_bias")
    errors = low_precision_errors(fused("triton"), torch.bfloat16, seeds=range(4), keys=keys, to_device=_on_device)
    for k, (ours, naive) in errors.items():
        assert ours <= naive + 1e-3, f"{k}: ours {ours:.2e} vs naive {naive:.2e} (means over the seeds)"


def test_triton_logprobs_with_entropy_grads():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(11, 8, generator=g), torch.randn(1100, 8, generator=g)
    ids = torch.randint(0, 1100, (11,), generator=g)
    results = []  # fp64 truth, the naive fp32 reference (this machine's yardstick), Triton
    for fn, dev, dtype in ((sk.reference.logprobs, "cpu", torch.float64), (sk.reference.logprobs, "cpu", torch.float32),
                           (lambda *a, **k: sk.fused_logprobs(*a, **k, backend="triton"), DEVICE, torch.float32)):
        h, w = hidden.to(dev, dtype).requires_grad_(), weight.to(dev, dtype).requires_grad_()
        lp, ent = fn(h, w, ids.to(dev), with_entropy=True)
        grads = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), (h, w))
        results.append([t.detach().cpu().double() for t in (lp, ent, *grads)])
    for expected, naive, actual in zip(*results):
        assert max_rel_err(actual, expected) <= max(1e-5, 5 * max_rel_err(naive, expected))


def test_package_imports_and_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, srpo_kernels as sk\n"
            "print(sk.fused_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2])).shape)\n"
            "try:\n    sk.fused_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), "
            "backend='triton')\nexcept ValueError as e:\n    print('error:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "torch.Size([3])" in out and "error: backend='triton' is unavailable" in out


def test_kernels_compile_for_an_h100_without_one():
    """The interpreter runs the kernels as Python: one that does not type-check or lower for a GPU passed here and
    would fail there. tests/compile_triton.py compiles each vocabulary-pass kernel, every constexpr variant, to
    sm_90 code with the ptxas that triton's wheel ships (no GPU needed), the on-chip GEMM kernel too.

    With the options the launches pin: FP fusion on. Left unset, Triton 3.9 warned that its default turns off in 3.10,
    and without it the JSD kernel's polynomials lose every FMA."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no CUDA backend with ptxas to compile with")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    script = os.path.join(os.path.dirname(__file__), "compile_triton.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("bytes of sm_90 code") == 14, out.stdout
    assert "FP_FUSION" not in out.stderr, out.stderr[-3000:]
    pinned, unfused = map(int, re.search(r"JSD divergence kernel: (\d+) pinned, (\d+) without", out.stdout).groups())
    assert pinned > unfused, out.stdout


@pytest.mark.parametrize("options", [dict(), dict(alpha=1.0), dict(alpha=0.0), dict(alpha=1 - 1e-8)], ids=str)
def test_triton_minus_inf_bias_and_alpha_next_to_one(options):
    """Masked vocabulary (-inf bias) gives finite outputs and matches the reference; alpha = 1 - 1e-8 is a JSD."""
    case = make_case(seed=5, n=25, h=16, v=301, mask_frac=0.0, ref=True)
    case["bias"][::3] = float("-inf")
    case["token_ids"] = (case["token_ids"] // 3 * 3 + 1).clamp(max=298)  # targets on unmasked tokens
    assert_fp32_no_worse_than_naive(fused("triton", chunk_size=16), case, to_device=_on_device, **options)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1 - 1e-8, 1.0])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_triton_teacher_and_student_nearly_agree(alpha, eps):
    """tests/test_edges.py's near-agreement regime, full vocabulary, on the Triton kernels (V = 2000: two blocks)."""
    case = make_case(seed=1, n=16, h=12, v=2000, sd_frac=1.0, mask_frac=0.0)
    g = torch.Generator().manual_seed(101)
    case["teacher_hidden"] = case["hidden"] + eps * torch.randn(case["hidden"].shape, generator=g,
                                                                dtype=torch.float64)
    assert_fp32_no_worse_than_naive(fused("triton", chunk_size=7), case, to_device=_on_device, alpha=alpha)


@pytest.mark.parametrize("side,alpha", FAR_APART)
def test_triton_one_side_far_sharper_than_the_other(side, alpha):
    """tests/test_edges.py's rows where one side's logits are in the hundreds and the other's a few units."""
    assert_fp32_no_worse_than_naive(fused("triton", chunk_size=5), far_apart_case(side), to_device=_on_device,
                                    alpha=alpha, entropy_beta=0.0)


def test_triton_top_k_tail_holding_most_of_the_mass():
    """tests/test_edges.py's flat rows whose tail bucket holds nearly everything, at entropy_beta = 300."""
    case = make_case(seed=3964, n=16, h=4, v=168, sd_frac=1.0, mask_frac=0.3, bias=False, old=False, isw=False,
                     scale=0.3)
    assert_fp32_no_worse_than_naive(fused("triton", chunk_size=7), case, to_device=_on_device, alpha=0.5, topk=1,
                                    entropy_beta=300.0)


def test_triton_teacher_entropy_is_as_good_as_rounded_fp32():
    """tests/test_backends.py's check of the teacher entropy's low part on the Triton passes (the kernel writes its
    shifted sums; log s and H follow in fp64), full vocabulary: within 2x fp32's own rounding of the exact value."""
    from srpo_kernels.backends import row_ops as S
    from srpo_kernels.backends.torch_chunked import torch_row_ops
    from srpo_kernels.backends.triton import triton_row_ops
    g = torch.Generator().manual_seed(4)
    scale = torch.linspace(0.05, 4.0, 16)[:, None]
    z, u = torch.randn(16, 1000, generator=g) * scale, torch.randn(16, 1000, generator=g) * scale
    y = torch.randint(0, 1000, (16,), generator=g)
    exact = S.teacher_entropy(torch_row_ops().distill_stats(z.double(), u.double(), y, 0.5, None, True)[0])
    st, _ = triton_row_ops().distill_stats(z.to(DEVICE), u.to(DEVICE), y.to(DEVICE), 0.5, None, True)
    err = float((S.teacher_entropy(st).cpu() - exact).abs().max())
    assert err <= 2 * float((exact.float().double() - exact).abs().max()), err


def _logprob_case(dtype, seed=0):
    """37 rows, H = 45, V = 2500: multiples of no block size or vocabulary span; -inf bias entries, T = 0.7."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 45, generator=g).to(dtype)
    weight = (torch.randn(2500, 45, generator=g) / 45 ** 0.5).to(dtype)
    bias = torch.randn(2500, generator=g)
    bias[::7] = float("-inf")
    ids = torch.randint(0, 357, (37,), generator=g) * 7 + 3  # targets on unmasked tokens
    return hidden, weight, bias, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_onchip_forward_no_worse_than_naive(dtype, monkeypatch):
    """Log-probs and entropies computed on chip (linear_stats.py) against fp64 on the same rounded inputs: no worse
    than the naive materialising computation in the same dtype (bf16 means over 4 seeds, as low_precision_errors)."""
    monkeypatch.setenv("SRPO_KERNELS_TRITON_FORWARD", "onchip")
    totals = {"logprobs": [0.0, 0.0], "entropy": [0.0, 0.0]}
    seeds = range(4) if dtype == torch.bfloat16 else range(1)
    for seed in seeds:
        hidden, weight, bias, ids = _logprob_case(dtype, seed)
        truth = sk.reference.logprobs(hidden.double(), weight.double(), ids, bias.double(), 0.7, with_entropy=True)
        naive = sk.reference.logprobs(hidden, weight, ids, bias.to(dtype), 0.7, with_entropy=True)
        monkeypatch.setattr(TritonPasses, "lse_entropy", _chunked_pass_called)  # the chunked path must not run
        with torch.no_grad():
            ours = sk.fused_logprobs(hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), bias.to(DEVICE), 0.7,
                                     with_entropy=True, backend="triton")
        for key, o, n, t in zip(totals, ours, naive, truth):
            assert torch.isfinite(o).all(), key
            totals[key][0] += max_rel_err(o.cpu().double(), t) / len(seeds)
            totals[key][1] += max_rel_err(n.double(), t) / len(seeds)
    for key, (ours_err, naive_err) in totals.items():
        bound = naive_err + 1e-3 if dtype == torch.bfloat16 else max(1e-6, 5 * naive_err)
        assert ours_err <= bound, f"{key}: ours {ours_err:.2e} vs naive {naive_err:.2e}"


def _chunked_pass_called(*_args):
    raise AssertionError("the chunked lse/entropy pass ran where the on-chip forward should have")


def test_onchip_and_chunked_forward_agree_under_autograd(monkeypatch):
    """The same loss, reduction="none" (forward without gradient, then a recomputing backward), with the on-chip
    and the chunked forward: equal outputs, and gradients from the unchanged backward."""
    case = make_case(seed=3, n=29, h=40, v=1100, sd_frac=0.4)
    results = []
    for choice in ("onchip", "chunked"):
        monkeypatch.setenv("SRPO_KERNELS_TRITON_FORWARD", choice)
        results.append(run(fused("triton", chunk_size=16), _on_device(case), dtype=torch.float32,
                           reduction="none"))
    onchip, chunked = ({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in results)
    assert_agree(onchip, chunked, rtol=1e-5)


def test_forward_choice_is_checked(monkeypatch):
    monkeypatch.setenv("SRPO_KERNELS_TRITON_FORWARD", "fast")
    with pytest.raises(ValueError, match="SRPO_KERNELS_TRITON_FORWARD must be onchip or chunked"):
        sk.fused_logprobs(torch.randn(3, 4, device=DEVICE), torch.randn(7, 4, device=DEVICE),
                          torch.tensor([0, 1, 2], device=DEVICE), backend="triton")
