"""Bad input is rejected with an error that names the argument."""
import functools
import math

import pytest
import torch

import srpo_kernels as sk
from cases import fused, make_case


def _args(**over):
    c = make_case(seed=1, n=12, v=31, h=8)
    a = dict(hidden=c["hidden"].float(), weight=c["weight"].float(), token_ids=c["token_ids"],
             advantages=c["advantages"].float(), route=c["route"], teacher_hidden=c["teacher_hidden"].float())
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    return sk.fused_srpo_loss(a.pop("hidden"), a.pop("weight"), a.pop("token_ids"), a.pop("advantages"),
                              a.pop("route"), a.pop("teacher_hidden"), **a)


BAD = {
    "hidden_not_tensor": (dict(hidden=[[1.0]]), TypeError, "hidden"),
    "hidden_int": (dict(hidden=torch.ones(12, 8, dtype=torch.int64)), TypeError, "hidden"),
    "weight_wrong_h": (dict(weight=torch.randn(31, 7)), ValueError, "weight"),
    "hidden_h0": (dict(hidden=torch.randn(12, 0), weight=torch.randn(31, 0), teacher_hidden=None), ValueError,
                  "H >= 1"),
    "hidden_meta": (dict(hidden=torch.randn(12, 8, device="meta")), ValueError, "meta"),
    "weight_dtype": (dict(weight=torch.randn(31, 8, dtype=torch.float64)), TypeError, "weight"),
    "ids_float": (dict(token_ids=torch.zeros(12)), TypeError, "token_ids"),
    "ids_shape": (dict(token_ids=torch.zeros(11, dtype=torch.long)), ValueError, "token_ids"),
    "ids_negative": (dict(token_ids=torch.full((12,), -1)), ValueError, "token_ids"),
    "ids_too_big": (dict(token_ids=torch.full((12,), 31)), ValueError, "token_ids"),
    "ids_ignore_index": (dict(token_ids=torch.full((12,), -100)), ValueError, "masked tokens need a valid id too"),
    "adv_shape": (dict(advantages=torch.zeros(5)), ValueError, "advantages"),
    "adv_nan": (dict(advantages=torch.full((12,), math.nan)), ValueError, "advantages"),
    "route_values": (dict(route=torch.full((12,), 2)), ValueError, "route"),
    "teacher_missing": (dict(teacher_hidden=None), ValueError, "teacher_hidden"),
    "teacher_rows": (dict(teacher_hidden=torch.randn(1, 8)), ValueError, "teacher_hidden"),
    "mask_shape": (dict(loss_mask=torch.ones(3, dtype=torch.bool)), ValueError, "loss_mask"),
    "old_shape": (dict(old_logprobs=torch.zeros(3)), ValueError, "old_logprobs"),
    "old_inf": (dict(old_logprobs=torch.full((12,), -math.inf)), ValueError, "old_logprobs"),
    # -inf or NaN log-probs of padding are the common cause: the error says to fill them.
    "old_inf_says_fill_padding": (dict(old_logprobs=torch.full((12,), -math.inf)), ValueError,
                                  r"masked positions too \(fill padding, e.g. old_logprobs.masked_fill"),
    # Finite as given in fp64, inf in the loss's fp32: the error says which.
    "old_fp64_beyond_fp32": (dict(old_logprobs=torch.full((12,), -1e300, dtype=torch.float64)), ValueError,
                             "old_logprobs must be finite everywhere in torch.float32"),
    "ref_missing": (dict(ref_beta=0.1), ValueError, "ref_logprobs"),
    # Constants of the loss: a gradient asked of them was None where plain autograd (the reference) gave one.
    "adv_requires_grad": (dict(advantages=torch.zeros(12, requires_grad=True)), ValueError,
                          "advantages requires grad, but the loss takes it as a constant"),
    "old_requires_grad": (dict(old_logprobs=torch.zeros(12, requires_grad=True)), ValueError,
                          "old_logprobs requires grad"),
    "ref_requires_grad": (dict(ref_logprobs=torch.zeros(12, requires_grad=True), ref_beta=0.1), ValueError,
                          "ref_logprobs requires grad"),
    "is_requires_grad": (dict(is_weights=torch.ones(12, requires_grad=True)), ValueError, "is_weights requires grad"),
    "is_negative": (dict(is_weights=-torch.ones(12)), ValueError, "is_weights"),
    "bias_shape": (dict(bias=torch.zeros(30)), ValueError, "bias"),
    "normalizer_zero": (dict(normalizer=0), ValueError, "normalizer"),
    # Only "mean" divides by it: with "sum" or "none" it was silently ignored.
    "normalizer_with_sum": (dict(normalizer=7.0, reduction="sum"), ValueError, "normalizer is the denominator"),
    "normalizer_with_none": (dict(normalizer=7.0, reduction="none"), ValueError, "reduction='none' it would be"),
    "weight_normalizer_nan": (dict(weight_normalizer=math.nan), ValueError, "weight_normalizer"),
    # Below V^-beta = 31^-1 no mean of exp(-beta H_T) can lie; 1e-300 gave an inf loss.
    "weight_normalizer_tiny": (dict(weight_normalizer=1e-300), ValueError, "weight_normalizer must be a mean"),
    "weight_normalizer_below_floor": (dict(weight_normalizer=0.03), ValueError, "in \\[V\\^-entropy_beta, 1\\]"),
    # Above exp(0) = 1 no mean of exp(-beta H_T) can lie either (a token count passed here shrank every SDPO loss).
    "weight_normalizer_above_one": (dict(weight_normalizer=12.0), ValueError, "weight_normalizer must be a mean"),
    "temperature_zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature_inf": (dict(temperature=math.inf), ValueError, "temperature"),
    "alpha_range": (dict(alpha=1.5), ValueError, "alpha"),
    "eps_nan": (dict(eps_low=math.nan), ValueError, "eps_low"),
    "dual_clip_low": (dict(dual_clip=0.5), ValueError, "dual_clip"),
    "topk_zero": (dict(topk=0), ValueError, "topk"),
    "is_clip_neg": (dict(is_clip=-1.0), ValueError, "is_clip"),
    "entropy_beta_neg": (dict(entropy_beta=-1.0), ValueError, "entropy_beta"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
    "chunk_size": (dict(chunk_size=0), ValueError, "chunk_size"),
    "cpu_backend_fp64": (dict(hidden=torch.randn(12, 8, dtype=torch.float64),
                              weight=torch.randn(31, 8, dtype=torch.float64),
                              teacher_hidden=torch.randn(int(make_case(seed=1, n=12, v=31, h=8)["route"].sum()), 8,
                                                         dtype=torch.float64), backend="cpu"), ValueError, "float64"),
}


def _poisoned(name, value, row=0):
    t = _args()[name].clone()
    t[row, 3] = value
    return t


for _name in ("hidden", "weight", "teacher_hidden"):
    for _label, _value in (("nan", math.nan), ("inf", math.inf), ("neg_inf", -math.inf)):
        BAD[f"{_name}_{_label}"] = (dict(**{_name: _poisoned(_name, _value)}), ValueError,
                                    f"{_name} must be finite everywhere")
# NaN rows of padding (attention over an all-masked row) are the common cause: the error says how to zero them.
BAD["hidden_nan_says_how_to_zero_padding"] = (dict(hidden=_poisoned("hidden", math.nan)), ValueError,
                                             "zero them first, e.g. hidden.masked_fill")
# Uninitialised padding (torch.empty) can hold finite values whose logits pass fp32's range: the same advice.
BAD["hidden_huge_says_how_to_zero_padding"] = (dict(hidden=_poisoned("hidden", 1e38)), ValueError,
                                              "beyond torch.float32's range .* e.g. hidden.masked_fill")
# Sparse or MKL-DNN tensors ended in torch's "Could not run 'aten::aminmax' with arguments from the 'SparseCPU'
# backend", which names an op, not the argument.
for _name in ("hidden", "weight", "token_ids", "advantages", "route", "teacher_hidden"):
    BAD[f"{_name}_sparse"] = (dict(**{_name: _args()[_name].to_sparse()}), TypeError,
                              f"{_name} must be a dense tensor, got layout torch.sparse_coo")
BAD["weight_mkldnn"] = (dict(weight=_args()["weight"].to_mkldnn()), TypeError, "weight must be a dense tensor")
BAD["bias_sparse"] = (dict(bias=torch.zeros(31).to_sparse()), TypeError, "bias must be a dense tensor")
BAD["mask_sparse"] = (dict(loss_mask=torch.ones(12, dtype=torch.bool).to_sparse()), TypeError,
                      "loss_mask must be a dense tensor")
for _label, _value in (("nan", math.nan), ("inf", math.inf)):
    _bias = torch.zeros(31)
    _bias[4] = _value
    BAD[f"bias_{_label}"] = (dict(bias=_bias), ValueError, "bias must be finite everywhere \\(-inf")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_named(name):
    over, exc, word = BAD[name]
    with pytest.raises(exc, match=word):
        _call(**over)


def test_device_mismatch_is_named():
    meta = torch.empty(31, 8, device="meta")
    with pytest.raises(ValueError, match="weight must be on"):
        _call(weight=meta)


def test_fused_logprobs_checks_its_arguments():
    with pytest.raises(ValueError, match="token_ids"):
        sk.fused_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="temperature"):
        sk.fused_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3]), temperature=-1.0)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="alpha"):
        sk.FusedSRPOLoss(alpha=2.0)
    with pytest.raises(ValueError, match="backend"):
        sk.FusedSRPOLoss(backend="gpu")
    with pytest.raises(TypeError):
        sk.FusedSRPOLoss(not_an_option=1)
    a = _args()
    with pytest.raises(TypeError, match="FusedSRPOLoss holds alpha, backend from its construction"):
        sk.FusedSRPOLoss(alpha=0.3)(**a, alpha=0.5, backend="cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_numpy_scalars_are_numbers(backend):
    # Options read from a config file or computed with numpy arrive as numpy scalars: the same as Python numbers.
    np = pytest.importorskip("numpy")
    a = _args()
    plain = dict(alpha=0.3, topk=5, temperature=0.7, entropy_beta=2.0, normalizer=9.0, chunk_size=5)
    numpy = dict(alpha=np.float64(0.3), topk=np.int64(5), temperature=np.float64(0.7),
                 entropy_beta=np.int32(2), normalizer=np.float64(9.0), chunk_size=np.int16(5))
    want = sk.fused_srpo_loss(**a, **plain, backend=backend)
    got = sk.fused_srpo_loss(**a, **numpy, backend=backend)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logprobs, want.logprobs)
    cfg = sk.SRPOLossConfig(topk=np.int64(3), alpha=np.float32(0.5))
    assert type(cfg.topk) is int and type(cfg.alpha) is float
    assert torch.equal(sk.fused_logprobs(a["hidden"], a["weight"], a["token_ids"], temperature=np.float32(0.5)),
                       sk.fused_logprobs(a["hidden"], a["weight"], a["token_ids"], temperature=0.5))
    with pytest.raises(ValueError, match="topk"):
        sk.SRPOLossConfig(topk=np.float64(3.0))


def test_mixed_operand_dtypes_say_the_way_out_and_autocast_takes_them():
    a = _args()
    a["hidden"] = a["hidden"].bfloat16()
    for fn in (sk.fused_srpo_loss, sk.reference.srpo_loss):
        with pytest.raises(TypeError, match=r"weight must have hidden's dtype .*autocast"):
            fn(**a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(fn(**a).loss)


@pytest.mark.parametrize("fn", [sk.fused_logprobs, sk.reference.logprobs])
def test_flags_must_be_bools_numpy_bools_included(fn):
    np = pytest.importorskip("numpy")
    a = _args()
    h, w, ids = a["hidden"], a["weight"], a["token_ids"]
    with pytest.raises(TypeError, match="with_entropy must be True or False, got 'no'"):
        fn(h, w, ids, with_entropy="no")
    assert torch.equal(fn(h, w, ids, with_entropy=np.True_)[1], fn(h, w, ids, with_entropy=True)[1])
    assert sk.SRPOLossConfig(topk_tail=np.False_).topk_tail is False  # said "must be a bool, got bool"
    with pytest.raises(TypeError, match="topk_tail must be True or False, got 1"):
        sk.SRPOLossConfig(topk_tail=1)


def test_double_backward_is_refused_with_a_clear_error():
    a = _args()
    hidden = a["hidden"].requires_grad_()
    losses = (lambda: _call(hidden=hidden).loss,
              lambda: sk.fused_logprobs(hidden, a["weight"], a["token_ids"]).sum())
    for make in losses:
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(make(), hidden, create_graph=True)


@pytest.mark.slow
def test_vocabulary_of_2_pow_24_falls_back_from_the_cpu_kernel():
    """The C++ kernel holds a row's argmax as an exact float (V < 2^24): "auto" takes the torch backend there, and
    backend="cpu" says why it cannot."""
    v = 1 << 24
    hidden, weight, ids = torch.randn(2, 1), torch.randn(v, 1), torch.tensor([0, v - 1])
    with pytest.raises(ValueError, match="below 2\\^24"):
        sk.fused_logprobs(hidden, weight, ids, backend="cpu")
    exact = sk.reference.logprobs(hidden.double(), weight.double(), ids)
    naive_err = float((sk.reference.logprobs(hidden, weight, ids).double() - exact).abs().max())
    err = float((sk.fused_logprobs(hidden, weight, ids).double() - exact).abs().max())
    assert err <= max(1e-5, 5 * naive_err), (err, naive_err)


def test_non_finite_inputs_are_refused_by_every_entry_point_and_minus_inf_bias_is_not():
    """One behaviour for NaN/inf in hidden, weight or bias (the backends used to disagree): a named error, from the
    fused loss, the fused log-probs and the reference alike; a -inf bias entry masks vocabulary and stays legal."""
    a = _args()
    bad_weight = _poisoned("weight", math.nan, row=7)
    for fn in (sk.fused_logprobs, sk.reference.logprobs):
        with pytest.raises(ValueError, match="weight must be finite"):
            fn(a["hidden"], bad_weight, a["token_ids"])
    with pytest.raises(ValueError, match="hidden must be finite"):
        sk.reference.srpo_loss(_poisoned("hidden", math.inf), a["weight"], a["token_ids"], a["advantages"],
                               a["route"], a["teacher_hidden"])
    bias = torch.zeros(31)
    bias[::5] = -math.inf
    ids = torch.full((12,), 1)
    assert torch.isfinite(_call(bias=bias, token_ids=ids).loss)


def test_a_bias_that_masks_every_entry_is_refused_by_every_entry_point():
    """A softmax over nothing, even with every token out of the loss: the backends gave NaN entropies (cpu) or 0
    (torch), the reference NaN gradients."""
    a = _args()
    bias = torch.full((31,), -math.inf)
    off = torch.zeros(12, dtype=torch.bool)
    for fn in (sk.fused_srpo_loss, sk.reference.srpo_loss):
        with pytest.raises(ValueError, match="bias masks every vocabulary entry"):
            fn(**a, bias=bias, loss_mask=off)
    for fn in (sk.fused_logprobs, sk.reference.logprobs):
        with pytest.raises(ValueError, match="bias masks every vocabulary entry"):
            fn(a["hidden"], a["weight"], a["token_ids"], bias=bias)


OVERFLOWING_LOGITS = {  # finite inputs whose logits (h W^T + b) / T pass fp32's range
    "hidden_and_weight": (dict(hidden=_args()["hidden"] * 1e20, weight=_args()["weight"] * 1e20), "hidden, weight"),
    "temperature": (dict(temperature=1e-40), "bias and temperature"),
    "bias": (dict(bias=torch.full((31,), 3e38)), "hidden, weight, bias"),
    "teacher_hidden": (dict(teacher_hidden=_args()["teacher_hidden"] * 1e36, weight=_args()["weight"] * 1e3),
                       "teacher_hidden, weight"),
}


@pytest.mark.parametrize("name", list(OVERFLOWING_LOGITS))
@pytest.mark.parametrize("impl", ["reference", "cpu", "torch"])
def test_logits_beyond_fp32_are_refused_by_every_entry_point(name, impl):
    """Such logits gave NaN in some backends and a finite, wrong loss in others (on-policy GRPO's value does not
    depend on log p): loss 0.0 with NaN log-probs from both kernels at entries of 1e19, NaN from the reference."""
    over, words = OVERFLOWING_LOGITS[name]
    a = _args(**over)
    loss = sk.reference.srpo_loss if impl == "reference" else fused(impl)
    with pytest.raises(ValueError, match=f"{words}.*beyond torch.float32's range"):
        loss(a.pop("hidden"), a.pop("weight"), a.pop("token_ids"), a.pop("advantages"), a.pop("route"),
             a.pop("teacher_hidden"), **a)
    if name != "teacher_hidden":
        logprobs = sk.reference.logprobs if impl == "reference" else functools.partial(sk.fused_logprobs,
                                                                                       backend=impl)
        a = _args(**over)
        with pytest.raises(ValueError, match="beyond torch.float32's range"):
            logprobs(a["hidden"], a["weight"], a["token_ids"], bias=a.get("bias"),
                     temperature=a.get("temperature", 1.0))


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_large_logits_within_fp32_still_work(impl):
    """Entries of 1e15 (logits near 1e30, far past the cheap bound's clearance) pass the sharper bound."""
    a = _args(hidden=_args()["hidden"] * 1e15, weight=_args()["weight"] * 1e15)
    a.update(old_logprobs=torch.zeros(12))
    truth = sk.reference.srpo_loss(*(t.double() if t.is_floating_point() else t for t in
                                     (a["hidden"], a["weight"], a["token_ids"], a["advantages"])), a["route"],
                                   a["teacher_hidden"].double(), old_logprobs=a["old_logprobs"].double())
    naive = sk.reference.srpo_loss(a["hidden"], a["weight"], a["token_ids"], a["advantages"], a["route"],
                                   a["teacher_hidden"], old_logprobs=a["old_logprobs"])
    ours = fused(impl)(a["hidden"], a["weight"], a["token_ids"], a["advantages"], a["route"], a["teacher_hidden"],
                       old_logprobs=a["old_logprobs"])
    assert torch.isfinite(ours.logprobs).all()
    naive_err = float((naive.logprobs.double() - truth.logprobs).abs().max())
    assert float((ours.logprobs.double() - truth.logprobs).abs().max()) <= 5 * naive_err + 1e-5 * float(
        truth.logprobs.abs().max())


def test_smallest_and_largest_possible_weight_normalizers_are_accepted():
    """V^-beta itself is the mean when every teacher token is uniform, 1 when every one is certain (and whatever
    the entropies when beta = 0): both ends are inclusive."""
    for wn, beta in ((31.0 ** -2.0, 2.0), (1.0, 2.0), (1.0, 0.0)):
        assert torch.isfinite(_call(weight_normalizer=wn, entropy_beta=beta).loss)


@pytest.mark.parametrize("fn", [sk.fused_srpo_loss, sk.reference.srpo_loss], ids=["fused", "reference"])
def test_a_sampled_token_that_bias_masks_is_refused_unless_loss_mask_leaves_it_out(fn):
    """Probability 0 under the policy: log-prob -inf and no defined on-policy ratio (the reference gave NaN, the
    kernels a finite loss). An error naming the token, from the fused loss and the reference alike."""
    a = _args()
    ids = a["token_ids"].reshape(3, 4).clamp(max=29)
    ids[1, 2] = 30  # the only token sampled at the masked entry
    a.update(hidden=a["hidden"].reshape(3, 4, 8), token_ids=ids, advantages=a["advantages"].reshape(3, 4))
    bias = torch.zeros(31)
    bias[30] = -math.inf
    for route in (torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)):  # GRPO and SDPO
        th = torch.randn(int(route.sum()), 8) if route.any() else None
        with pytest.raises(ValueError, match=r"1 token\(s\) in the loss .* token_ids\[1, 2\] = 30.*loss_mask"):
            fn(**dict(a, route=route, teacher_hidden=th), bias=bias)
    mask = ids != 30
    out = fn(**dict(a, route=torch.zeros(3, 4, dtype=torch.bool), teacher_hidden=None), bias=bias, loss_mask=mask)
    assert torch.isfinite(out.loss) and torch.isneginf(out.logprobs[1, 2])
    out = fn(**dict(a, route=torch.zeros(3, 4, dtype=torch.bool), teacher_hidden=None), bias=bias, loss_mask=mask,
             old_logprobs=torch.full((3, 4), -3.0))
    assert torch.isfinite(out.loss) and torch.isneginf(out.logprobs[1, 2])


@pytest.mark.parametrize("fn", [fused(b) for b in ("torch", "cpu")] + [sk.reference.srpo_loss],
                         ids=["torch", "cpu", "reference"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_teacher_hidden_takes_the_students_dtype(fn, hidden_dtype):
    """The teacher's rows go through the student's GEMM: a teacher_hidden of another dtype (an fp32 EMA teacher
    beside a bf16 student) is cast to hidden's, the same in every implementation (the reference raised a raw
    matmul dtype error)."""
    a = _args()
    a.update(hidden=a["hidden"].to(hidden_dtype), weight=a["weight"].to(hidden_dtype))
    want = fn(**dict(a, teacher_hidden=a["teacher_hidden"].to(hidden_dtype)))
    for other in (torch.float64, torch.float16, torch.float32, torch.bfloat16):
        got = fn(**dict(a, teacher_hidden=a["teacher_hidden"].double().to(other)))
        if other in (torch.float64, torch.float32):  # exact in hidden's dtype once cast
            assert torch.equal(got.loss, want.loss) and torch.equal(got.teacher_entropy, want.teacher_entropy)
        assert torch.isfinite(got.loss)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_one_number_of_advantage_applies_to_every_token(backend):
    """A Python float, a numpy scalar and a 0-d tensor are the same advantage for every token."""
    np = pytest.importorskip("numpy")
    a = _args()
    want = sk.fused_srpo_loss(**dict(a, advantages=torch.full((12,), 0.75)), backend=backend).loss
    for adv in (0.75, np.float32(0.75), torch.tensor(0.75), torch.tensor(0.75, dtype=torch.float64)):
        assert torch.equal(sk.fused_srpo_loss(**dict(a, advantages=adv), backend=backend).loss, want), adv


def test_dtensor_weight_is_refused_with_the_way_out():
    import os
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            weight = distribute_tensor(torch.randn(10, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
            with pytest.raises(TypeError, match="weight.full_tensor"):
                sk.fused_logprobs(torch.randn(3, 4), weight, torch.zeros(3, dtype=torch.long))
        finally:
            dist.destroy_process_group()


def test_constants_that_require_grad_are_taken_under_no_grad():
    """Evaluation under no_grad asks no gradient of anything: a grad-requiring advantage is fine there."""
    with torch.no_grad():
        out = _call(advantages=torch.zeros(12, requires_grad=True))
    assert torch.isfinite(out.loss)
