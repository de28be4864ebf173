"""Property-based agreement with the reference over random shapes and options (hypothesis; 200 examples each; fp32
against fp64 within the larger of the fixed bound and 5x the naive fp32 error of the same run)."""
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cases import assert_agree, fused, make_case, naive_fp32, near_topk_tie, ref_loss, run

# derandomize: CI sees the same 200 examples every run (a red CI should mean a regression, not a new draw).
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 10_000), n=st.integers(1, 40), h=st.integers(1, 12), v=st.integers(2, 300),
    sd_frac=st.sampled_from([0.0, 0.3, 0.5, 1.0]), mask_frac=st.sampled_from([0.0, 0.3, 1.0]),
    bias=st.booleans(), old=st.booleans(), isw=st.booleans(), ref=st.booleans()))
options = st.fixed_dictionaries(dict(
    alpha=st.sampled_from([0.0, 0.5, 1.0, 0.25]), topk=st.sampled_from([None, 1, 3, 17, 400]),
    topk_tail=st.booleans(), temperature=st.floats(0.3, 2.0), reduction=st.sampled_from(["mean", "sum", "none"]),
    entropy_beta=st.sampled_from([0.0, 1.0, 3.0]), chunk_size=st.integers(1, 50)))


def _split(problem, opts):
    opts = dict(opts)
    chunk = opts.pop("chunk_size")
    if problem["ref"]:
        opts["ref_beta"] = 0.1
    return opts, chunk


@SETTINGS
@given(problems, options)
def test_torch_backend_float64_equals_reference(problem, opts):
    opts, chunk = _split(problem, opts)
    case = make_case(**problem)
    assert_agree(run(fused("torch", chunk_size=chunk), case, **opts), run(ref_loss, case, **opts), rtol=1e-8, atol=1e-12)


@SETTINGS
@given(problems, options)
def test_cpu_backend_float32_agrees_with_reference(problem, opts):
    # atol: temperatures down to 0.3 make logits of ~30, whose fp32 rounding alone is ~4e-6.
    opts, chunk = _split(problem, opts)
    case = make_case(**problem)
    assume(not near_topk_tie(case, opts))
    expected = run(ref_loss, case, **opts)
    # A sampled token far in a sharp tail makes the k3 penalty exp(ref - logp) astronomically large (1e20+), where
    # fp32 keeps no relative digits to compare; such losses are not a training regime.
    assume(float(expected["loss"].abs().max()) < 1e6)
    assert_agree(run(fused("cpu", chunk_size=chunk), case, dtype=torch.float32, **opts), expected, rtol=1e-5,
                 atol=1e-5, naive=naive_fp32(case, **opts))
