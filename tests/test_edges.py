"""Numeric edges of the public API: each was a silently wrong number once (issue 11), each is judged against fp64
and against the naive fp32 error measured in the same run."""
import math

import pytest
import torch

from cases import (FAR_APART, assert_fp32_no_worse_than_naive, far_apart_case, fused, make_case, naive_fp32, ref_loss,
                   run)

BACKENDS = ["torch", "cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [13.5, 16.0, 20.0, 200.0])
def test_large_entropy_beta(backend, beta):
    """exp(-beta H_T) underflows fp32 past beta H_T ~ 87 (H_T ~ log 1000 here): only the normalised weight may
    matter. Two chunks of different teacher entropies make the running normaliser rescale."""
    case = make_case(seed=3, n=40, h=16, v=1000, sd_frac=1.0, mask_frac=0.1)
    teacher = case["teacher_hidden"]
    case["teacher_hidden"] = teacher * torch.linspace(0.01, 0.5, teacher.shape[0])[:, None]
    ours = assert_fp32_no_worse_than_naive(fused(backend, chunk_size=16), case, entropy_beta=beta)
    assert abs(ours["metrics"]["distill_weight_mean"] - 1.0) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_weight_takes_the_teacher_entropy_beyond_fp32(backend):
    """exp(-beta H_T) multiplies H_T's error by beta: with H_T rounded to fp32 (half an ulp, 2.4e-7 at H_T ~ 5) the
    C++ backend's dh and dW came to 1.1x the 5x-naive bound here at beta = 50 (a sweep over seeds of
    test_large_entropy_beta's case; which seed shows it is the luck of each rounding: the commit before this
    test's did). The weights now take H_T with its low part (row_ops.T_ENTROPY_LO)."""
    case = make_case(seed=8, n=40, h=16, v=1000, sd_frac=1.0, mask_frac=0.1)
    teacher = case["teacher_hidden"]
    case["teacher_hidden"] = teacher * torch.linspace(0.01, 0.5, teacher.shape[0], dtype=teacher.dtype)[:, None]
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=16), case, entropy_beta=50.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_that_is_not_a_power_of_two_divides_the_logits(backend):
    """Logits times fl(1/T) carry the rounding of 1/T on a whole row at once, and a row's entropy sums it
    coherently; the naive loss divides each logit by T. Here (all SDPO, beta = 30, T = 1.3, found by a random sweep)
    dh, dW and db came to 2.6x the 5x-naive bound on both backends before the fp32 GEMM path divided."""
    case = make_case(seed=609593, n=18, h=25, v=210, sd_frac=1.0, scale=3.0)
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=16), case, temperature=1.3, entropy_beta=30.0,
                                    alpha=0.0)


def test_large_entropy_beta_reference_is_finite():
    case = make_case(seed=3, n=12, h=8, v=1000, sd_frac=1.0)
    out = run(ref_loss, case, dtype=torch.float32, entropy_beta=1000.0)
    assert all(torch.isfinite(out[k]).all() for k in ("loss", "distill_weight", "grad_hidden", "grad_weight"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_gradients_finite_with_a_masked_sdpo_token(dtype):
    """A masked SDPO token's weight is normalised by tokens it is not among: at beta = 300 it overflowed, and the
    reference masked the product w * is * D afterwards, so its gradients were 0 * inf = NaN (found by random draws:
    the fp64 ground truth itself was NaN there). The fused losses gave 0 all along."""
    case = make_case(seed=5294, n=2, h=2, v=142, sd_frac=1.0, mask_frac=0.3, scale=1.0)
    case["loss_mask"] = torch.tensor([False, True])
    case["bias"][2::3] = -math.inf
    case["token_ids"] = case["token_ids"] - (case["token_ids"] % 3 == 2).long()
    options = dict(alpha=0.0, temperature=0.5, reduction="sum", entropy_beta=300.0)
    out = run(ref_loss, case, dtype=dtype, **options)
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("loss", "grad_hidden", "grad_weight", "grad_bias"))
    assert_fp32_no_worse_than_naive(fused("cpu", chunk_size=7), case, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1 - 1e-8, 1 - 1e-6, 0.9999, 1e-8])
def test_alpha_next_to_the_ends(backend, alpha):
    """alpha = 1 - 1e-8 is a JSD with weight 1e-8 on KL(p||m), not reverse KL (fp32 rounds alpha to 1)."""
    case = make_case(seed=4, n=30, h=16, v=301, sd_frac=1.0)
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=16), case, alpha=alpha)


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(alpha=1.0), dict(alpha=0.0), dict(topk=5)], ids=str)
def test_minus_inf_bias_masks_the_vocabulary(impl, options):
    """A -inf bias entry removes a token: every output and gradient stays finite and equals the problem without it."""
    case = make_case(seed=5, n=25, h=16, v=301, mask_frac=0.0)
    case["bias"][::3] = -math.inf
    case["token_ids"] = (case["token_ids"] // 3 * 3 + 1).clamp(max=298)  # targets on unmasked tokens
    fn = ref_loss if impl == "reference" else fused(impl, chunk_size=16)
    out = run(fn, case, dtype=torch.float32, **options)
    for k in ("loss", "logprobs", "entropy", "teacher_entropy", "divergence", "grad_hidden", "grad_bias"):
        assert torch.isfinite(out[k]).all(), k
    assert torch.isfinite(out["grad_weight"]).all()
    assert (out["grad_weight"][::3] == 0).all() and (out["grad_bias"][::3] == 0).all()
    # The same problem with the masked rows removed from the vocabulary (token ids remapped).
    keep = torch.ones(301, dtype=torch.bool)
    keep[::3] = False
    small = dict(case, weight=case["weight"][keep], bias=case["bias"][keep])
    small["token_ids"] = (torch.cumsum(keep.long(), 0) - 1)[case["token_ids"]]
    expected = run(ref_loss, small, **options)
    for k in ("loss", "logprobs", "entropy", "teacher_entropy", "divergence", "grad_hidden"):
        assert torch.allclose(out[k], expected[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_empty_top_k_tail(impl, alpha):
    """Top-K covering every live token: the tail holds only -inf entries, its log-prob takes the floor, and every
    output and gradient stays finite and equal to the reference's."""
    case = make_case(seed=6, n=9, h=8, v=12, mask_frac=0.0, ref=True)
    case["bias"][::2] = -math.inf  # six live tokens
    case["token_ids"] = case["token_ids"] // 2 * 2 + 1
    options = dict(alpha=alpha, topk=6, topk_tail=True)
    fn = ref_loss if impl == "reference" else fused(impl, chunk_size=4)
    out = run(fn, case, dtype=torch.float32, **options)
    expected = run(ref_loss, case, **options)
    for k in ("loss", "logprobs", "entropy", "teacher_entropy", "divergence", "grad_hidden", "grad_weight"):
        assert torch.isfinite(out[k]).all(), k
        assert torch.allclose(out[k], expected[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropies_are_never_negative(backend):
    """Sharp rows (weight x 100): a rounded log-prob just above 0 once gave H = -1.4e-5."""
    case = make_case(seed=1, n=30, h=16, v=301, sd_frac=1.0, scale=100.0)
    out = run(fused(backend, chunk_size=16), case, dtype=torch.float32, alpha=1.0, topk=10)
    assert (out["entropy"] >= 0).all() and (out["teacher_entropy"] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_upstream_gradient_at_masked_tokens_is_ignored(backend):
    """reduction="none" then a per-sequence mean over a fully padded sequence (NaN) and nansum: the NaN lands on
    masked tokens only, which contribute nothing."""
    case = make_case(seed=2, n=24, h=8, v=101, mask_frac=0.0)
    case["loss_mask"][:6] = False
    grads = {}
    for name, fn in (("fused", fused(backend, chunk_size=8)), ("reference", ref_loss)):
        h = case["hidden"].float().requires_grad_()
        w = case["weight"].float().requires_grad_()
        out = fn(h, w, case["token_ids"], case["advantages"].float(), case["route"], case["teacher_hidden"].float(),
                 loss_mask=case["loss_mask"], bias=case["bias"].float(), reduction="none")
        upstream = torch.ones(24)
        upstream[:6] = math.nan
        grads[name] = torch.autograd.grad(out.loss, (h, w), upstream)
    for ours, ref in zip(grads["fused"], grads["reference"]):
        assert torch.isfinite(ours).all()
        assert torch.allclose(ours, torch.nan_to_num(ref), rtol=1e-4, atol=1e-6)


def _sampled_logprobs(case):
    """The fp64 log-probs of the case's sampled tokens (old log-probs are set relative to them)."""
    return ref_loss(**{k: case[k] for k in ("hidden", "weight", "token_ids", "advantages", "bias")}).logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_upstream_gradient_at_tokens_whose_surrogate_is_constant_is_ignored(backend, bad):
    """Where the clip (tokens 0, 1), the dual clip (2) or A = 0 (3, 4) holds the GRPO surrogate it is constant in the
    logits: such a token contributes nothing, as autograd's clamp and max give it nothing, so a NaN/inf upstream
    gradient there stays out of dh and dW. The fused losses multiplied it by their zero coefficient (NaN in every dW
    entry), and the reference passed it on at A = 0 only while its ratio was below the overflow cap."""
    case = make_case(seed=4, n=16, h=8, v=64, sd_frac=0.0, mask_frac=0.0, isw=False)
    logp = _sampled_logprobs(case)
    case["advantages"][:5] = torch.tensor([1.0, -1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    # log-ratios: clipped high with A > 0, clipped low with A < 0, past the dual clip, far out and in range at A = 0
    case["old_logprobs"] = logp - torch.tensor([5.0, -5.0, 5.0, 5.0, 0.1] + [0.0] * 11, dtype=torch.float64)
    constant = torch.zeros(16, dtype=torch.bool)
    constant[:5] = True
    grads = {}
    for name, fn in (("fused", fused(backend, chunk_size=8)), ("reference", ref_loss)):
        for upstream_there in (bad, 0.0):
            h = case["hidden"].float().requires_grad_()
            w = case["weight"].float().requires_grad_()
            out = fn(h, w, case["token_ids"], case["advantages"].float(), bias=case["bias"].float(),
                     old_logprobs=case["old_logprobs"].float(), reduction="none")
            assert torch.equal(out.clipped, torch.arange(16) < 3)
            upstream = torch.linspace(0.5, 2.0, 16)
            upstream[constant] = upstream_there
            grads[name, upstream_there] = torch.autograd.grad(out.loss, (h, w), upstream)
    for name in ("fused", "reference"):
        for with_bad, without in zip(grads[name, bad], grads[name, 0.0]):
            assert torch.equal(with_bad, without), name
    for ours, ref in zip(grads["fused", bad], grads["reference", bad]):
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nonfinite_scalar_upstream_gradient_reaches_only_tokens_that_contribute(backend, reduction):
    """A NaN upstream gradient of a "mean"/"sum" loss: the rows of dh of masked tokens, and of tokens whose
    surrogate a clip holds, stay 0 as in autograd (the handed-over gradients times NaN were NaN everywhere)."""
    case = make_case(seed=4, n=16, h=8, v=64, sd_frac=0.3, mask_frac=0.0, isw=False)
    case["loss_mask"][5:8] = False
    logp = _sampled_logprobs(case)
    case["advantages"][:2] = 1.0
    case["route"][:2] = False
    case["old_logprobs"] = logp - 0.01
    case["old_logprobs"][:2] -= 5.0  # ratio e^5: the clip holds the loss
    case["teacher_hidden"] = case["teacher_hidden"][:int(case["route"].sum())]
    finite_rows = {}
    for name, fn in (("fused", fused(backend, chunk_size=8)), ("reference", ref_loss)):
        h = case["hidden"].float().requires_grad_()
        out = fn(h, case["weight"].float(), case["token_ids"], case["advantages"].float(), case["route"],
                 case["teacher_hidden"].float(), bias=case["bias"].float(), loss_mask=case["loss_mask"],
                 old_logprobs=case["old_logprobs"].float(), reduction=reduction)
        assert bool(out.clipped[0]) and bool(out.clipped[1])
        (dh,) = torch.autograd.grad(out.loss, (h,), torch.tensor(math.nan))
        finite_rows[name] = torch.isfinite(dh).all(1)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[0, 1, 5, 6, 7]] = True
    assert torch.equal(finite_rows["reference"], expected)
    assert torch.equal(finite_rows["fused"], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("scale", [0.05, 1.0], ids=["flat", "moderate"])
def test_fp32_gradients_of_flat_distributions(backend, alpha, scale):
    """Flat rows once had 14-64x the naive dW error: the argmax rebalance (right for sharp rows) summed V similar
    terms there. The sharp regime is tests/test_api.py's sharp_logits."""
    case = make_case(seed=7, n=3, h=31, v=673, sd_frac=1.0, mask_frac=0.0, scale=scale)
    assert_fp32_no_worse_than_naive(fused(backend), case, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-3, 1e-5])
def test_jsd_gradients_of_nearly_uniform_rows(backend, scale):
    """At alpha = 0.5 the JSD's s = log q - log p of nearly uniform rows straddles 0, where the C++ kernel took
    exp(-|s|) from the ratio of p and q: their rows' rounded log-sums tilted d by the sign of s, 4-25x the naive dh
    error (V = 20 000). Now log1p(exp(-|s|)) comes from its series there."""
    case = make_case(seed=1, n=8, h=8, v=20000, sd_frac=1.0, mask_frac=0.0, bias=False, old=False, scale=scale)
    assert_fp32_no_worse_than_naive(fused(backend), case, alpha=0.5, entropy_beta=0.0)


def _nearly_agreeing(seed, eps, v):
    """Every row SDPO, the teacher's hidden state the student's plus eps N(0, 1): divergences ~eps^2."""
    case = make_case(seed=seed, n=16, h=12, v=v, sd_frac=1.0, mask_frac=0.0)
    g = torch.Generator().manual_seed(seed + 100)
    case["teacher_hidden"] = case["hidden"] + eps * torch.randn(case["hidden"].shape, generator=g, dtype=torch.float64)
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.5, 1 - 1e-8, 1.0])
@pytest.mark.parametrize("topk", [None, 5])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_teacher_and_student_nearly_agree(backend, alpha, topk, eps):
    """Where teacher and student nearly agree (the common case in self-distillation), sum p (log p - log q) cancels
    to ~eps^2 from terms of size eps: naive fp32 is wrong by percents at eps = 1e-3, and its luck varies. Every
    divergence is a sum of non-negative terms here (support.phi_terms; the JSD's two KLs to m alike), log q - log p
    comes from the logits' own difference, and the JSD's terms keep it apart from log(a / (1-a)). Once 5-50x the
    naive error (alpha = 1, and the gradients at 1 - 1e-8)."""
    case = _nearly_agreeing(seed=1, eps=eps, v=2000)
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=alpha, topk=topk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side,alpha", FAR_APART)
def test_one_side_far_sharper_than_the_other(backend, side, alpha):
    """Full vocabulary, teacher or student 300x as sharp as the other: log q - log p as (u - z) + lse_gap rounded
    u - z and the gap at their size, ~300, while the terms that matter are a few units (divergence 1e-5, dh and dW
    2e-5 against the naive 6e-7; found by a sweep of scaled hidden states; top-K supports had been fixed by
    support_deltas). u - z is now kept exactly and the gap as a pair (support.log_ratio), the reverse KL's t alike."""
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=5), far_apart_case(side), alpha=alpha,
                                    entropy_beta=0.0)


TWIN_CASES = {  # (make_case arguments, loss options), each once a failure of random draws (top-K, no tail)
    "topk_renorm_rkl": (dict(seed=6454, n=12, h=7, v=120, isw=True, old=False),
                        dict(alpha=1.0, topk=5, topk_tail=False, temperature=1.7, reduction="sum",
                             entropy_beta=300.0)),
    "topk_renorm_jsd": (dict(seed=4072, n=14, h=8, v=190, mask_frac=0.3, bias=False, isw=True, old=False),
                        dict(alpha=0.3, topk=5, topk_tail=False, reduction="none", entropy_beta=1.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TWIN_CASES))
def test_twins_tied_at_the_top(backend, name):
    """Duplicated vocabulary rows put two entries of p = 1/2 at a row's top and a sharp teacher puts the divergence
    at ~150: each twin's p (t - sum p t) was a difference of nearly equal ~150s (the rebalance covers one entry).
    The terms are now taken relative to their value at p's argmax, exactly 0 on both twins (the full vocabulary's
    too, support.full_vocab_shift); the C++ support also took log p as x - lse, rounded at |lse|. Was up to 290x
    the naive dW error."""
    problem, options = TWIN_CASES[name]
    case = make_case(**problem, sd_frac=1.0, scale=30.0)
    half = problem["v"] // 2
    case["weight"][half:2 * half] = case["weight"][:half]
    if case.get("bias") is not None:
        case["bias"][half:2 * half] = case["bias"][:half]
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, **options)


def _twins(case, masked_vocab=False):
    """The second half of the vocabulary duplicates the first (tied logits); optionally every third bias entry -inf
    (targets moved onto live tokens), as the fuzz's edges do."""
    half = case["weight"].shape[0] // 2
    case["weight"][half:2 * half] = case["weight"][:half]
    if case.get("bias") is not None:
        case["bias"][half:2 * half] = case["bias"][:half]
        if masked_vocab:
            case["bias"][2::3] = -math.inf
            case["token_ids"] = case["token_ids"] - (case["token_ids"] % 3 == 2).long()
    return case


@pytest.mark.parametrize("backend", BACKENDS)
def test_twin_heavy_entries_are_rebalanced_together(backend):
    """Twin top logits of p ~ 1/2 each, a teacher that nearly agrees on them: each twin's entry p - q is a difference
    of two ~1/2s, 300x the naive dh error (found by random draws; the reference, renormalising its top-K support over
    the whole vocabulary, projects its gradient as a log-softmax backward does). The rebalance moved only a sharp
    row's argmax (p > 1/2); it now shares the row sum among the heavy entries (p >= 1/16) where they hold more than
    half the mass."""
    case = _twins(make_case(seed=2506, n=4, h=10, v=4, sd_frac=1.0, mask_frac=0.3, isw=True))
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.0, topk=5, temperature=0.5,
                                    reduction="none", entropy_beta=30.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_tail_far_below_the_max_spreads_by_its_own_softmax(backend):
    """A tail member 200 below the row's max holding the teacher's mass (twins split between the top-K support and
    the tail, scale 30, T = 0.5): its p_j / p_tail = exp((z - m) - log s - log p_tail) rounded at |z - m|, 1e5x the
    naive error in the bias gradient (found by random draws). It is the tail's own softmax now,
    exp((z - m_t) - log s_t)."""
    case = _twins(make_case(seed=8440, n=12, h=4, v=8, sd_frac=1.0, mask_frac=0.3, isw=False, scale=30.0),
                  masked_vocab=True)
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.0, topk=3, temperature=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_token_with_a_vanishing_old_logprob(backend):
    """A masked token whose old log-prob is -200 (exp(logp - old) overflows fp32) contributes nothing: the reference's
    gradients stay finite (they were NaN everywhere) and the fused ones equal them."""
    case = make_case(seed=5, n=12, v=61, mask_frac=0.0)
    case["loss_mask"][4] = False
    case["old_logprobs"][4] = -200.0
    ref = run(ref_loss, case, dtype=torch.float32)
    grads = ("grad_hidden", "grad_weight", "grad_bias")
    assert all(bool(torch.isfinite(ref[k]).all()) for k in grads)
    ours = run(fused(backend), case, dtype=torch.float32)
    for k in ("loss",) + grads:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("old", [False, True])
def test_masked_token_sampled_at_a_masked_vocabulary_entry(backend, old):
    """A token left out by loss_mask may sample an entry that a -inf bias masks (a padding id, say): its log-prob is
    -inf, and the reference's logp - stopgrad(logp) = -inf - -inf made every gradient NaN. It contributes nothing."""
    case = make_case(seed=9, n=20, v=41, old=old)
    case["bias"][::4] = -math.inf
    case["token_ids"] = case["token_ids"] // 4 * 4 + 1  # live targets...
    case["token_ids"][case["loss_mask"].logical_not()] = 0  # ...except at the masked tokens
    assert bool(case["loss_mask"].logical_not().any()) and bool(case["route"].any())
    keys = ("loss", "entropy", "teacher_entropy", "divergence", "distill_weight", "grad_hidden", "grad_weight",
            "grad_bias")  # every output but the log-probs, -inf at the masked tokens
    ours = assert_fp32_no_worse_than_naive(fused(backend, chunk_size=8), case, keys=keys)
    assert torch.isneginf(ours["logprobs"][~case["loss_mask"]]).all()
    assert torch.isfinite(ours["logprobs"][case["loss_mask"]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("old", [-100.0, -1e4])
@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_ratio_that_overflows_where_no_gradient_flows(backend, old, dual_clip):
    """Old log-probs far below the current ones: exp(logp - old) overflows fp32 (fp64 too at -1e4). Where A = 0
    (-0 * inf made the fused loss NaN and the token count as clipped) and where the clip or the dual clip holds the
    loss, and at SDPO tokens, which do not take the surrogate (the reference's backward gave 0 * inf = NaN), the loss
    and every gradient are finite and equal fp64's. (A GRPO token with A < 0 and no dual clip has a loss of -A * rho:
    infinite in fp32 for any implementation.)"""
    case = make_case(seed=8, n=24, v=61, mask_frac=0.1)
    case["old_logprobs"][:] = old
    case["advantages"][::3] = 0.0
    assert bool(((case["advantages"] < 0) & case["route"] & case["loss_mask"]).any())
    if dual_clip is None:
        case["advantages"] = torch.where(case["route"], case["advantages"], case["advantages"].abs())
    ours = assert_fp32_no_worse_than_naive(fused(backend, chunk_size=8), case, dual_clip=dual_clip)
    truth = run(ref_loss, case, dual_clip=dual_clip)
    assert torch.equal(ours["clipped"], truth["clipped"])
    assert not truth["clipped"][::3].any()  # A = 0: nothing is clipped
    assert ours["metrics"]["clip_fraction"] == truth["metrics"]["clip_fraction"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_tail_gradient_takes_shifted_log_probs(backend):
    """The top-K path's p_j outside the support (and the tail's p_j / p_tail) came from exp(z - lse), rounded at
    |lse|: 25x the naive dh error on a row of this case (found by random draws, T = 0.5, top-1 with a tail). Every
    backend now takes them as exp((z - m) - log s)."""
    case = make_case(seed=148, n=16, h=1, v=61, sd_frac=0.4, mask_frac=0.0, isw=False)
    case["weight"][30:60] = case["weight"][:30]
    case["bias"][30:60] = case["bias"][:30]
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.5, topk=1, temperature=0.5,
                                    reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 5])
def test_top_k_tail_holding_most_of_the_mass(backend, topk):
    """On a flat row the tail bucket holds nearly everything and log p_tail ~ -K/V: taken as (m_t - m) + (log s_t -
    log s) it rounded at |log s| ~ 5, and exp(-beta H_T) multiplied that by beta = 300 (2.5x the naive error in the
    distill weights, found by random draws). It is now log1p(-the support's mass) wherever the support holds less
    than half."""
    case = make_case(seed=3964, n=16, h=4, v=168, sd_frac=1.0, mask_frac=0.3, bias=False, old=False, isw=False,
                     scale=0.3)
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.5, topk=topk, entropy_beta=300.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_support_deltas_from_the_logits(backend):
    """A top-K support where teacher and student nearly agree (|delta| ~ 1e-2, forward KL, tail of 64%): log q - log p
    came from two log-probs rounded at |log s|, so every delta carried 2.4e-7 and the divergence 1.5e-5 (relative);
    dh reached 1.04x the bound (found by random draws). The support now takes (u - z) + lse_gap from fp64 log-sums
    where that is the more accurate form, its tail's as log1p(-sum p_k expm1(delta_k) / p_tail), and forward KL's
    p - q as -p expm1(delta) where |delta| < 1 (support.support_deltas, tail_delta, divergence_grad)."""
    problem = dict(seed=4196, n=1, h=1, v=132, sd_frac=1.0, mask_frac=0.0, bias=True, old=False, isw=False)
    case = make_case(**problem)
    case["bias"][2::3] = -math.inf  # masked vocabulary, targets on live tokens
    case["token_ids"] = case["token_ids"] - (case["token_ids"] % 3 == 2).long()
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.0, topk=5, temperature=1.7,
                                    reduction="sum", entropy_beta=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_penalty_where_the_policy_is_near_its_reference(backend):
    """ref - logp ~ 1e-3 (early in training): exp(r) - r - 1 cancels to r^2 / 2 from terms of size 1, 2% of the
    loss (here nothing else: zero advantages, all GRPO) in fp32, as in the naive loss. k3 now comes from its series
    (token_math.k3_penalty); what remains is logp's own rounding, which r carries. Judged per token (the largest
    error of 27): the naive loss's errors are its exp's roundings, which a sum could cancel by luck on some CPU."""
    case = make_case(seed=5, n=30, h=16, v=203, sd_frac=0.0, mask_frac=0.1, old=False, isw=False, ref=True)
    case["advantages"].zero_()
    logp = ref_loss(case["hidden"], case["weight"], case["token_ids"], case["advantages"], bias=case["bias"]).logprobs
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=logp.dtype)
    case["ref_logprobs"] = logp.detach() + 1e-3 * noise
    options = dict(ref_beta=0.05, reduction="none")
    ours = assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, **options)
    truth, naive = run(ref_loss, case, **options), naive_fp32(case, **options)
    assert (ours["loss"] - truth["loss"]).abs().max() <= 0.1 * (naive["loss"] - truth["loss"]).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_gradient_where_teacher_and_student_are_far_apart(backend):
    """Logits of scale 30 (twin vocabulary rows, full vocabulary, forward KL): -p expm1(log q - log p), which keeps
    p - q's digits where the rows nearly agree, overflowed where p is tiny and q is not, and the gradients were NaN
    (found by random draws). It is taken only where |log q - log p| < 1."""
    case = make_case(seed=2938, n=19, h=1, v=133, sd_frac=1.0, mask_frac=0.3, isw=False, scale=30.0)
    case["weight"][66:132] = case["weight"][:66]
    case["bias"][66:132] = case["bias"][:66]
    assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, alpha=0.0, reduction="none")
