"""Autograd behaviour: float64 gradcheck of both Functions, per-token upstream gradients, fused_logprobs."""
import pytest
import torch

import srpo_kernels as sk
from cases import make_case


def _loss_fn(case, **options):
    def f(hidden, weight=case["weight"], bias=case["bias"]):
        out = sk.fused_srpo_loss(hidden, weight, case["token_ids"], case["advantages"], case["route"],
                                 case["teacher_hidden"], loss_mask=case["loss_mask"],
                                 old_logprobs=case.get("old_logprobs"), ref_logprobs=case.get("ref_logprobs"),
                                 is_weights=case["is_weights"], bias=bias, backend="torch", chunk_size=3, **options)
        return out.loss
    return f


# Stop-gradients limit what a finite difference can check: the GRPO rows need old log-probs (on-policy the ratio is
# exp(logp - sg(logp)), constant under perturbation) and are checked w.r.t. hidden, weight and bias; the SDPO rows
# are checked w.r.t. hidden only and on-policy (the teacher, its entropy weight and the IS weight are detached).
# atol 1e-6: the clip kinks make central differences that coarse; exactness against autograd is in test_api.
@pytest.mark.parametrize("options", [
    dict(), dict(reduction="sum"), dict(reduction="none", dual_clip=None), dict(ref_beta=0.2, temperature=0.8),
    dict(ref_beta=0.2, reduction="none", eps_low=0.05, eps_high=0.05),
], ids=str)
def test_gradcheck_grpo_float64(options):
    case = make_case(seed=2, n=7, h=3, v=11, ref=True, sd_frac=0.0)
    inputs = tuple(case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(_loss_fn(case, **options), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("options", [
    dict(), dict(alpha=0.0, reduction="sum"), dict(alpha=1.0, reduction="none"), dict(topk=3),
    dict(topk=3, topk_tail=False, alpha=0.3, reduction="none"), dict(ref_beta=0.2, temperature=0.8, alpha=1.0),
    dict(topk=4, alpha=0.0, weight_normalizer=0.7, normalizer=3.0),
], ids=str)
def test_gradcheck_sdpo_float64(options):
    case = make_case(seed=3, n=7, h=3, v=11, ref=True, sd_frac=1.0, old=False)
    hidden = case["hidden"].clone().requires_grad_()
    assert torch.autograd.gradcheck(_loss_fn(case, **options), (hidden,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_logprobs_matches_reference_with_entropy_grads(backend, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 8, generator=g)
    weight = torch.randn(157, 8, generator=g)
    bias = torch.randn(157, generator=g) if with_bias else None
    ids = torch.randint(0, 157, (3, 13), generator=g)
    up_lp, up_ent = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)
    results = []  # fp64 truth, the naive fp32 reference (its error is this CPU's yardstick), ours
    for fn, dtype in ((sk.reference.logprobs, torch.float64), (sk.reference.logprobs, torch.float32),
                      (lambda *a, **k: sk.fused_logprobs(*a, **k, backend=backend, chunk_size=5), torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight)] + \
                 ([bias.to(dtype).requires_grad_()] if with_bias else [])
        lp, ent = fn(leaves[0], leaves[1], ids, bias=leaves[2] if with_bias else None, temperature=0.9,
                     with_entropy=True)
        grads = torch.autograd.grad((lp * up_lp.to(dtype)).sum() + (ent * up_ent.to(dtype)).sum(), leaves)
        results.append([t.detach() for t in (lp, ent, *grads)])
    for expected, naive, actual in zip(*results):
        assert actual.shape == expected.shape
        err, naive_err = (float((t.double() - expected).abs().max() / expected.abs().max()) for t in (actual, naive))
        assert err <= max(1e-5, 5 * naive_err), (err, naive_err)


def test_fused_logprobs_without_entropy_returns_a_tensor():
    lp = sk.fused_logprobs(torch.randn(5, 4), torch.randn(9, 4), torch.arange(5))
    assert isinstance(lp, torch.Tensor) and lp.shape == (5,)
    assert torch.allclose(lp, sk.reference.logprobs(torch.randn(0, 4), torch.randn(9, 4), torch.arange(0)).new_tensor(
        lp.tolist()), atol=0)


def test_frozen_weight_skips_its_gradient():
    case = make_case(seed=3)
    h = case["hidden"].float().requires_grad_()
    w = case["weight"].float()  # frozen (LoRA-style)
    out = sk.fused_srpo_loss(h, w, case["token_ids"], case["advantages"].float(), case["route"],
                             case["teacher_hidden"].float())
    out.loss.backward()
    assert w.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


def _in_fp32(case):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("retain", [False, True])
def test_upstream_gradient_scales_the_handed_over_gradients(reduction, retain):
    """d(c * loss) = c * d(loss), bit for bit (the accumulators are scaled in place), the first backward (gradients
    computed in forward) and a second one through a retained graph (recomputed) alike."""
    case = make_case(seed=5, n=9, h=6, v=29, sd_frac=0.4)
    c = _in_fp32(case)

    def grads(scale):
        h, w, b = (c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
        out = sk.fused_srpo_loss(h, w, c["token_ids"], c["advantages"], c["route"], c["teacher_hidden"],
                                 loss_mask=c["loss_mask"], bias=b, reduction=reduction)
        if retain:
            (out.loss * 0.5).backward(retain_graph=True)
            for t in (h, w, b):
                t.grad = None
        (out.loss * scale).backward()
        return h.grad, w.grad, b.grad

    for unit, scaled in zip(grads(1.0), grads(0.37)):
        assert torch.equal(scaled, unit * torch.tensor(0.37))


def _autocast_run(case, dtype, autocast, backend, call, hidden_dtype=None):
    """(value, dh, dW, db) of `call` ("loss", "none" or "logprobs") on leaves of `dtype` (hidden's `hidden_dtype`
    where given), inside a bf16 autocast region or not."""
    w, b = (case[k].to(dtype).requires_grad_() for k in ("weight", "bias"))
    h = case["hidden"].to(hidden_dtype or dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if call == "logprobs":
            lp, ent = sk.fused_logprobs(h, w, case["token_ids"], bias=b, with_entropy=True, backend=backend)
            value = lp.sum() + (ent * 0.3).sum()
        else:
            out = sk.fused_srpo_loss(h, w, case["token_ids"], case["advantages"].float(), case["route"],
                                     case["teacher_hidden"].to(dtype), bias=b, backend=backend,
                                     reduction="none" if call == "none" else "mean")
            value = out.loss.sum()
        value.backward()  # inside the region, as a training step under autocast does
    return value.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("call", ["loss", "none", "logprobs"])
@pytest.mark.parametrize("native", [True, False], ids=["low-precision-gemms", "widened-gemms"])
def test_autocast_casts_the_operands_and_stays_out_of_the_gemms(backend, call, native, monkeypatch):
    # Under autocast the fused loss takes bf16 operands, as F.linear would, and gives fp32 leaves fp32 gradients
    # equal to those of explicit bf16 leaves; the widened policy's fp32 GEMMs stay fp32 (autocast would make them
    # bf16 GEMMs: a different dh).
    from srpo_kernels import gemm
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: native)
    case = make_case(seed=3, n=40, h=16, v=301)
    want = _autocast_run(case, torch.bfloat16, False, backend, call)
    got = _autocast_run(case, torch.float32, True, backend, call)
    mixed = _autocast_run(case, torch.float32, True, backend, call, hidden_dtype=torch.bfloat16)
    for a, b, c in zip(want, got, mixed):
        assert torch.equal(a.float(), b) and torch.equal(b, c.float())
    assert all(g.dtype == torch.float32 for g in got[1:])


_PER_TOKEN = ["token_ids", "advantages", "route", "loss_mask", "teacher_hidden", "old_logprobs", "ref_logprobs",
              "is_weights"]


def _fp32_case(seed=6):
    return _in_fp32(make_case(seed=seed, n=9, h=6, v=29, sd_frac=0.4, ref=True))


def _loss_of(c, h, reduction, **extra):
    return sk.fused_srpo_loss(h, c["weight"], c["token_ids"], c["advantages"], c["route"], c["teacher_hidden"],
                              old_logprobs=c["old_logprobs"], ref_logprobs=c["ref_logprobs"], ref_beta=0.1,
                              loss_mask=c["loss_mask"], is_weights=c["is_weights"], bias=c["bias"],
                              reduction=reduction, **extra).loss


@pytest.mark.parametrize("name", _PER_TOKEN)
@pytest.mark.parametrize("path", ["none", "retained-mean"])
def test_backward_refuses_inputs_changed_in_place(name, path):
    """A backward that recomputes reads the per-token tensors again (views of the caller's, no copies): one changed
    in place after the forward (a reused buffer) gave the gradient of a loss that was never computed, silently.
    Now it is refused by name, as autograd refuses its own saved tensors."""
    c = _fp32_case()
    h = c["hidden"].clone().requires_grad_()
    loss = _loss_of(c, h, "none" if path == "none" else "mean").sum()
    if path == "retained-mean":
        loss.backward(retain_graph=True)
    c[name].copy_(c[name].roll(1, 0))
    with pytest.raises(RuntimeError, match=f"{name} was modified in place"):
        loss.backward()


@pytest.mark.parametrize("name", _PER_TOKEN)
def test_gradients_computed_in_forward_ignore_later_changes(name):
    """A "mean" loss's first backward hands over the gradients the forward computed: a later in-place change is
    harmless there, and not refused."""
    c = _fp32_case()
    expected = []
    for change in (False, True):
        h = c["hidden"].clone().requires_grad_()
        loss = _loss_of(c, h, "mean")
        if change:
            saved = c[name].clone()
            c[name].copy_(c[name].roll(1, 0))
        loss.backward()
        expected.append(h.grad)
        if change:
            c[name].copy_(saved)
    assert torch.equal(*expected)


def test_fused_logprobs_refuses_token_ids_changed_in_place():
    c = _fp32_case()
    h = c["hidden"].clone().requires_grad_()
    logp = sk.fused_logprobs(h, c["weight"], c["token_ids"])
    c["token_ids"].add_(1).remainder_(c["weight"].shape[0])
    with pytest.raises(RuntimeError, match="token_ids was modified in place"):
        logp.sum().backward()


def test_inputs_made_under_inference_mode_are_accepted():
    """Rollout tensors are often made under inference_mode: they carry no version counter, and need none."""
    c = _fp32_case()
    with torch.inference_mode():
        made = {k: c[k].clone() for k in _PER_TOKEN}
    h = c["hidden"].clone().requires_grad_()
    _loss_of({**c, **made}, h, "none").sum().backward()
    reference = c["hidden"].clone().requires_grad_()
    _loss_of(c, reference, "none").sum().backward()
    assert torch.equal(h.grad, reference.grad)
