"""fused_srpo_loss against the materialising reference: loss, per-token outputs, metrics and all gradients."""
import pytest
import torch

import srpo_kernels as sk
from cases import assert_agree, fused, make_case, naive_fp32, ref_loss, run

BACKENDS = ["torch", "cpu"]
OPTION_CASES = {
    "jsd": {},
    "forward_kl": dict(alpha=0.0),
    "reverse_kl": dict(alpha=1.0),
    "jsd_alpha_0.3": dict(alpha=0.3),
    "topk_tail": dict(topk=7),
    "topk_tail_fkl": dict(topk=7, alpha=0.0),
    "topk_tail_rkl": dict(topk=7, alpha=1.0),
    "topk_renorm": dict(topk=7, topk_tail=False),
    "topk_renorm_fkl": dict(topk=5, topk_tail=False, alpha=0.0),
    "topk_renorm_rkl": dict(topk=5, topk_tail=False, alpha=1.0),
    "topk_ge_vocab": dict(topk=500),
    "temperature": dict(temperature=0.6),
    "hot_temperature": dict(temperature=1.7, topk=9),
    "ref_kl": dict(ref_beta=0.05),
    "ref_kl_sum": dict(ref_beta=0.05, reduction="sum"),
    "ref_kl_none": dict(ref_beta=0.05, reduction="none"),
    "no_entropy_weight": dict(entropy_beta=0.0),
    "strong_entropy_weight": dict(entropy_beta=2.5),
    "no_clips": dict(dual_clip=None, is_clip=None),
    "tight_clips": dict(eps_low=0.01, eps_high=0.01, is_clip=0.9, dual_clip=1.5),
    "normalizers": dict(normalizer=50, weight_normalizer=0.3),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "none_topk": dict(reduction="none", topk=6),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_match_reference(backend, name):
    options = OPTION_CASES[name]
    case = make_case(seed=hash(name) % 1000, ref="ref_beta" in options)
    expected = run(ref_loss, case, **options)
    actual = run(fused(backend, chunk_size=8), case, dtype=torch.float32, **options)
    assert_agree(actual, expected, naive=naive_fp32(case, **options))


CASE_VARIANTS = {
    "all_grpo": dict(sd_frac=0.0),
    "all_sdpo": dict(sd_frac=1.0),
    "no_mask": dict(mask_frac=0.0),
    "mostly_masked": dict(mask_frac=0.9),
    "no_bias": dict(bias=False),
    "on_policy": dict(old=False),
    "no_is_weights": dict(isw=False),
    "frozen_weight": dict(weight_grad=False),
    "odd_shapes": dict(n=53, v=131, h=9),
    "sharp_logits": dict(scale=6.0),
    "batched_2d": dict(n=36, shape=(4, 9)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASE_VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cases_match_reference(backend, name, reduction):
    case = make_case(seed=len(name), **CASE_VARIANTS[name])
    expected = run(ref_loss, case, reduction=reduction, topk=None if "grpo" in name else 8)
    options = dict(reduction=reduction, topk=None if "grpo" in name else 8)
    actual = run(fused(backend, chunk_size=16), case, dtype=torch.float32, **options)
    assert_agree(actual, expected, naive=naive_fp32(case, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_sdpo_token(backend):
    case = make_case(seed=3)
    case["loss_mask"] = ~case["route"]  # every SDPO-routed token masked out
    expected = run(ref_loss, case)
    actual = run(fused(backend, chunk_size=8), case, dtype=torch.float32)
    assert_agree(actual, expected, naive=naive_fp32(case))
    assert actual["metrics"]["sdpo_fraction"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_everything_masked_gives_zero_loss_and_grads(backend, reduction):
    case = make_case(seed=4)
    case["loss_mask"] = torch.zeros_like(case["loss_mask"])
    actual = run(fused(backend), case, dtype=torch.float32, reduction=reduction)
    assert torch.count_nonzero(actual["loss"]) == 0
    for k in ("grad_hidden", "grad_weight", "grad_bias"):
        assert torch.count_nonzero(actual[k]) == 0, k
    assert_agree(actual, run(ref_loss, case, reduction=reduction), naive=naive_fp32(case, reduction=reduction))


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
def test_chunk_size_does_not_change_results(chunk_size):
    case = make_case(seed=5)
    expected = run(ref_loss, case, topk=4)
    assert_agree(run(fused("cpu", chunk_size=chunk_size), case, dtype=torch.float32, topk=4), expected,
                 naive=naive_fp32(case, topk=4))


def test_torch_backend_is_exact_in_float64():
    """To fp64's rounding: the divergences' series (support.phi_terms) once stopped at fp32's needs, 4e-11 off an
    exact (mpmath) JSD that the reference met to 2e-16."""
    case = make_case(seed=6, ref=True)
    for options in (dict(ref_beta=0.1), dict(topk=6, alpha=1.0), dict(reduction="none", alpha=0.0), dict(alpha=0.3)):
        assert_agree(run(fused("torch", chunk_size=8), case, **options), run(ref_loss, case, **options), rtol=1e-13,
                     atol=1e-15)


def test_module_form_matches_functional():
    case = make_case(seed=7)
    module = sk.FusedSRPOLoss(alpha=1.0, topk=5, backend="cpu", chunk_size=8)
    a = run(lambda *x, **k: module(*x, **k), case, dtype=torch.float32)
    b = run(fused("cpu", chunk_size=8), case, dtype=torch.float32, alpha=1.0, topk=5)
    assert_agree(a, b, rtol=0)
    assert "alpha=1.0" in repr(module)


def test_outputs_are_shaped_like_token_ids_and_zero_off_branch():
    case = make_case(seed=8, n=36, shape=(6, 6))
    out = sk.fused_srpo_loss(case["hidden"].float(), case["weight"].float(), case["token_ids"],
                             case["advantages"].float(), case["route"], case["teacher_hidden"].float(),
                             loss_mask=case["loss_mask"], reduction="none")
    for name in ("loss", "logprobs", "entropy", "teacher_entropy", "divergence", "distill_weight", "clipped"):
        assert getattr(out, name).shape == (6, 6), name
    grpo = ~case["route"]
    for name in ("teacher_entropy", "divergence", "distill_weight"):
        assert torch.count_nonzero(getattr(out, name)[grpo]) == 0, name
    assert not out.clipped[case["route"]].any()
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_per_sequence_advantages_and_route_broadcast():
    case = make_case(seed=9, n=36, shape=(4, 9), sd_frac=0.0)
    seq_adv = torch.randn(4, 1, dtype=torch.float64)
    seq_route = torch.tensor([[True], [False], [True], [False]])
    case["advantages"] = seq_adv
    case["route"] = seq_route
    case["teacher_hidden"] = torch.randn(18, 16, dtype=torch.float64)
    expected = run(ref_loss, case)
    assert_agree(run(fused("cpu"), case, dtype=torch.float32), expected, naive=naive_fp32(case))
    full = dict(case, advantages=seq_adv.expand(4, 9).clone(), route=seq_route.expand(4, 9).clone())
    assert_agree(run(ref_loss, full), expected, rtol=1e-12)


def test_grad_in_forward_scales_with_upstream():
    case = make_case(seed=10)
    a = run(fused("cpu"), case, dtype=torch.float32)  # upstream 1.7
    h = case["hidden"].float().requires_grad_()
    out = sk.fused_srpo_loss(h, case["weight"].float(), case["token_ids"], case["advantages"].float(),
                             case["route"], case["teacher_hidden"].float(), loss_mask=case["loss_mask"],
                             old_logprobs=case["old_logprobs"].float(), is_weights=case["is_weights"].float(),
                             bias=case["bias"].float())
    out.loss.backward()
    assert torch.allclose(h.grad.double() * 1.7, a["grad_hidden"], rtol=1e-6, atol=1e-9)


def test_no_grad_forward_matches():
    case = make_case(seed=11)
    with torch.no_grad():
        out = sk.fused_srpo_loss(case["hidden"].float(), case["weight"].float(), case["token_ids"],
                                 case["advantages"].float(), case["route"], case["teacher_hidden"].float())
    ref = sk.reference.srpo_loss(case["hidden"], case["weight"], case["token_ids"], case["advantages"],
                                 case["route"], case["teacher_hidden"])
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())


def test_under_torch_compile_results_match_eager_and_diagnostics_stay_detached():
    """torch.compile (dynamo; the loss is a graph break) drops mark_non_differentiable: the per-token diagnostics
    came back requiring grad, so a term built on them looked differentiable while its gradient was dropped."""
    case = make_case(seed=12, n=20, v=61)
    hidden = case["hidden"].float()

    def step(h):
        out = sk.fused_srpo_loss(h * 1.0, case["weight"].float(), case["token_ids"], case["advantages"].float(),
                                 case["route"], case["teacher_hidden"].float(), backend="cpu")
        return out.loss, out.logprobs, out.entropy, out.distill_weight

    eager_h = hidden.clone().requires_grad_()
    eager = step(eager_h)
    eager[0].backward()
    torch._dynamo.reset()
    compiled_h = hidden.clone().requires_grad_()
    compiled = torch.compile(step, backend="eager")(compiled_h)
    compiled[0].backward()
    assert all(not t.requires_grad for t in compiled[1:])
    for a, b in zip(compiled, eager):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(compiled_h.grad, eager_h.grad)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_call_on_leaves_that_require_grad_computes_no_gradients(monkeypatch, mode, reduction):
    """Evaluation under no_grad with the model's parameters (requires_grad=True): needs_input_grad still said yes,
    so the forward ran the dh/dW GEMMs and held a V x H fp32 accumulator for a backward that never comes."""
    from srpo_kernels import function

    case = make_case(seed=13, n=30, v=97)
    args = [case[k].float() if case[k].is_floating_point() else case[k]
            for k in ("hidden", "weight", "token_ids", "advantages", "route", "teacher_hidden")]
    args[0].requires_grad_()
    args[1].requires_grad_()
    want = sk.fused_srpo_loss(*args, backend="cpu", reduction=reduction)

    def no_gradients(*_):
        raise AssertionError("gradient accumulators allocated under no_grad")

    monkeypatch.setattr(function.ChunkRunner, "new_grads", no_gradients)
    with mode():
        got = sk.fused_srpo_loss(*args, backend="cpu", reduction=reduction)
    assert not got.loss.requires_grad
    assert torch.equal(got.loss, want.loss.detach()) and torch.equal(got.logprobs, want.logprobs)
