"""Fuzz of the public loss (slow: 1,000 examples on the torch and cpu backends, 40 on Triton under the
interpreter): random problems mixed with numeric edges must match float64 within the naive fp32 error of the same
run, and random bad inputs must raise an error naming the argument. Run alone with
``pytest -m slow tests/test_api_fuzz.py``; CI runs it with the rest."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import srpo_kernels as sk
from cases import assert_fp32_no_worse_than_naive, fused, make_case, near_topk_tie, ref_loss, run

pytestmark = pytest.mark.slow


def _settings(n):
    # derandomize: CI sees the same examples every run (a red CI should mean a regression, not a new draw).
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 10_000), n=st.integers(1, 24), h=st.integers(1, 10), v=st.integers(2, 200),
    sd_frac=st.sampled_from([0.0, 0.4, 1.0]), mask_frac=st.sampled_from([0.0, 0.3, 1.0]),
    bias=st.booleans(), old=st.booleans(), isw=st.booleans(), ref=st.booleans(),
    scale=st.sampled_from([1e-3, 0.3, 1.0, 30.0])))  # 1e-3: nearly uniform rows
options = st.fixed_dictionaries(dict(
    alpha=st.sampled_from([0.0, 1e-8, 0.3, 0.5, 1 - 1e-8, 1.0]),
    topk=st.sampled_from([None, 1, 5, 300]),
    topk_tail=st.booleans(), temperature=st.sampled_from([0.5, 1.0, 1.7]),
    reduction=st.sampled_from(["mean", "sum", "none"]), entropy_beta=st.sampled_from([0.0, 1.0, 30.0, 300.0])))
edges = st.fixed_dictionaries(dict(
    masked_vocab=st.booleans(),  # every third bias entry -inf (targets of tokens in the loss kept on live entries,
    #                              those of tokens out of it moved onto masked ones: log-prob -inf)
    twins=st.booleans(),  # the second half of the vocabulary duplicates the first: tied logits
    far_old=st.booleans(),  # old log-probs 100 below: exp(logp - old) overflows fp32 (the clips hold the loss)
    zero_adv=st.booleans(),  # A = 0 at every third token (with far_old: -0 * inf)
))


def _apply_edges(case, problem, edge):
    v = problem["v"]
    if edge["twins"] and v >= 4:
        half = v // 2
        case["weight"][half:2 * half] = case["weight"][:half]
        if case.get("bias") is not None:
            case["bias"][half:2 * half] = case["bias"][:half]
    if edge["masked_vocab"] and case.get("bias") is not None and v >= 3:
        case["bias"][2::3] = -math.inf
        case["token_ids"] = case["token_ids"] - (case["token_ids"] % 3 == 2).long()
        case["token_ids"][~case["loss_mask"]] = 2
    if edge["far_old"] and case.get("old_logprobs") is not None:
        case["old_logprobs"] = case["old_logprobs"] - 100.0
    if edge["zero_adv"]:
        case["advantages"][::3] = 0.0
    return case


def _check_valid(backend, problem, opts, edge):
    ref = problem.pop("ref")
    case = _apply_edges(make_case(**problem, ref=ref), problem, edge)
    if ref:
        opts["ref_beta"] = 0.05
    assume(not near_topk_tie(case, opts))
    truth = run(ref_loss, case, **opts)
    # A sampled token deep in a sharp tail makes the k3 penalty exp(ref - logp) astronomically large, where fp32
    # keeps no relative digits to compare; such losses are no training regime.
    assume(bool(torch.isfinite(truth["loss"]).all()) and float(truth["loss"].abs().max()) < 1e6)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    keys = [k for k, t in truth.items() if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
    if not bool(torch.isfinite(truth["logprobs"]).all()):  # -inf at tokens out of the loss (masked_vocab)
        keys.remove("logprobs")
    ours = assert_fp32_no_worse_than_naive(fused(backend, chunk_size=7), case, keys=keys,
                                           to_device=lambda c: _to(c, device),
                                           floor=max(1e-5, _logit_rounding(case, opts)), **opts)
    assert torch.equal(torch.isneginf(ours["logprobs"]), torch.isneginf(truth["logprobs"]))
    # Signs that a relative error of ~1e-16 values does not see (a cpu entropy once came out at -1.4e-5).
    for key in ("entropy", "teacher_entropy", "divergence", "distill_weight"):
        assert bool((ours[key] >= 0).all()), f"{key}: negative, {float(ours[key].min()):.3g}"
    assert bool((ours["logprobs"] <= 0).all()), f"logprobs: positive, {float(ours['logprobs'].max()):.3g}"


def _logit_rounding(case, opts):
    """The relative error any fp32 implementation inherits from rounding its logits: 8 eps |z|max. A GEMM blocked
    otherwise rounds a logit of 300 differently by ~3e-5, which a sharp row's entropy carries whole; the naive
    run's own draw of that error can be 5x luckier (one case, not a mean)."""
    z = case["hidden"].reshape(-1, case["hidden"].shape[-1]) @ case["weight"].T
    if case.get("bias") is not None:
        z = z + case["bias"]
    finite = z[torch.isfinite(z)]
    if not finite.numel():
        return 0.0
    return 8 * torch.finfo(torch.float32).eps * float(finite.abs().max()) / opts["temperature"]


def _to(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _corruptions(case):
    """name -> (argument overrides, the word the error must name)."""
    n, h = case["hidden"].shape
    v = case["weight"].shape[0]
    nan_h = case["hidden"].clone()
    nan_h[0, 0] = math.nan
    inf_w = case["weight"].clone()
    inf_w[-1, -1] = math.inf
    masked_target_bias = torch.zeros(v, dtype=torch.float64)
    masked_target_bias[case["token_ids"][0]] = -math.inf  # a token in the loss samples a masked entry
    return {
        "hidden_nan": (dict(hidden=nan_h), "hidden"),
        "weight_inf": (dict(weight=inf_w), "weight"),
        "bias_nan": (dict(bias=torch.full((v,), math.nan, dtype=torch.float64)), "bias"),
        "bias_shape": (dict(bias=torch.zeros(v + 1, dtype=torch.float64)), "bias"),
        "bias_masks_all": (dict(bias=torch.full((v,), -math.inf, dtype=torch.float64),
                                loss_mask=torch.zeros(n, dtype=torch.bool)), "bias masks every"),
        "ids_high": (dict(token_ids=torch.full((n,), v)), "token_ids"),
        "ids_float": (dict(token_ids=case["token_ids"].double()), "token_ids"),
        "adv_nan": (dict(advantages=torch.full((n,), math.nan, dtype=torch.float64)), "advantages"),
        "adv_shape": (dict(advantages=torch.zeros(n + 1, dtype=torch.float64)), "advantages"),
        "teacher_rows": (dict(route=torch.ones(n, dtype=torch.bool), teacher_hidden=torch.zeros(n + 1, h)),
                         "teacher_hidden"),
        "mask_values": (dict(loss_mask=torch.full((n,), 3)), "loss_mask"),
        "old_inf": (dict(old_logprobs=torch.full((n,), -math.inf, dtype=torch.float64)), "old_logprobs"),
        "weight_normalizer": (dict(weight_normalizer=1e-300, entropy_beta=1.0), "weight_normalizer"),
        "weight_normalizer_high": (dict(weight_normalizer=2.0), "weight_normalizer"),
        "normalizer_with_sum": (dict(normalizer=5.0, reduction="sum"), "normalizer"),
        "masked_target": (dict(bias=masked_target_bias, loss_mask=torch.ones(n, dtype=torch.bool)), "token_ids"),
        "alpha": (dict(alpha=-0.1), "alpha"),
        "topk": (dict(topk=0), "topk"),
        "temperature": (dict(temperature=math.nan), "temperature"),
        # Finite, but (h W^T) / T beyond fp32 (entries of 1e25; a temperature of 1e-45): NaN or a wrong finite loss.
        "logits_overflow": (dict(hidden=case["hidden"] * 1e25, weight=case["weight"] * 1e25), "beyond"),
        "temperature_overflows_logits": (dict(temperature=1e-45), "temperature"),
        "chunk_size": (dict(chunk_size=-3), "chunk_size"),
        # Constants of the loss that require grad: no gradient would reach them (the reference's would).
        "adv_requires_grad": (dict(advantages=case["advantages"].clone().requires_grad_()), "advantages"),
        "old_requires_grad": (dict(old_logprobs=torch.zeros(n, dtype=torch.float64, requires_grad=True)),
                              "old_logprobs"),
        "ids_ignore_index": (dict(token_ids=torch.full((n,), -100)), "token_ids"),
    }


def _check_bad(backend, problem, which):
    problem.pop("ref")
    case = make_case(**problem)
    overrides, word = _corruptions(case)[which]
    args = {k: v for k, v in case.items() if not k.startswith("_")}
    args.update(overrides)
    args["hidden"], args["weight"] = args["hidden"].float(), args["weight"].float()
    if args.get("teacher_hidden") is not None:
        args["teacher_hidden"] = args["teacher_hidden"].float()
    if args.get("bias") is not None:
        args["bias"] = args["bias"].float()
    chunk = args.pop("chunk_size", None)
    pos = [args.pop(k) for k in ("hidden", "weight", "token_ids", "advantages", "route", "teacher_hidden")]
    with pytest.raises((ValueError, TypeError), match=word):
        sk.fused_srpo_loss(*pos, **args, backend=backend, chunk_size=chunk)


BAD_NAMES = sorted(_corruptions(make_case(n=3, v=5)))


@_settings(int(os.environ.get("FUZZ_N", 1000)))
@given(backend=st.sampled_from(["torch", "cpu"]), bad=st.sampled_from([None] * len(BAD_NAMES) + BAD_NAMES),
       problem=problems,
       opts=options, edge=edges)
def test_fuzz_cpu_backends(backend, bad, problem, opts, edge):
    if bad is None:
        _check_valid(backend, problem, opts, edge)
    else:
        _check_bad(backend, problem, bad)


@_settings(int(os.environ.get("FUZZ_N", 1000)) // 5)
@given(backend=st.sampled_from(["torch", "cpu"]), problem=problems, opts=options, edge=edges,
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), picks=st.lists(st.integers(0, 23), min_size=1, max_size=4))
def test_fuzz_nonfinite_upstream_gradient(backend, problem, opts, edge, bad, picks):
    """A NaN/inf upstream gradient (at some tokens of reduction="none", or of a "mean"/"sum" loss) reaches the rows
    of dh, and dW and db, exactly where it reaches the fp64 reference's (a masked token, or one whose surrogate a
    clip holds, contributes nothing), and the finite gradients agree. (Within a dW it reaches, rows of masked
    vocabulary entries may differ: 0 * NaN in autograd's log-softmax, 0 in the kernels.)"""
    ref = problem.pop("ref")
    case = _apply_edges(make_case(**problem, ref=ref), problem, edge)
    opts = dict(opts, ref_beta=0.05 if ref else 0.0)
    assume(not near_topk_tie(case, opts))
    n = case["hidden"].shape[0]
    if opts["reduction"] == "none":
        upstream = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
        upstream[[i % n for i in picks]] = bad
    else:
        upstream = torch.tensor(bad, dtype=torch.float64)
    truth = run(ref_loss, case, upstream=upstream, **opts)
    assume(bool(torch.isfinite(truth["loss"]).all()) and float(truth["loss"].abs().max()) < 1e6)  # as _check_valid
    ours = run(fused(backend, chunk_size=7), case, dtype=torch.float32, upstream=upstream, **opts)
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        t, o = truth.get(name), ours.get(name)
        if t is None:
            continue
        finite_t, finite_o = torch.isfinite(t), torch.isfinite(o)
        rows = name == "grad_hidden"
        finite_t, finite_o = (finite_t.all(1), finite_o.all(1)) if rows else (finite_t.all(), finite_o.all())
        assert torch.equal(finite_o, finite_t), f"{name}: finite at {finite_o.tolist()}, reference {finite_t.tolist()}"
        if not rows and finite_t:
            # (fp32's subnormals, below tiny, keep no relative digits)
            floor = 1e-3 * float(t.abs().max()) + torch.finfo(torch.float32).tiny
            assert torch.allclose(o.double(), t, rtol=1e-3, atol=floor), name


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs CUDA or TRITON_INTERPRET=1")
@_settings(40)
@given(problem=problems, opts=options, edge=edges)
def test_fuzz_triton(problem, opts, edge):
    pytest.importorskip("triton", reason="triton not installed")
    _check_valid("triton", problem, opts, edge)
