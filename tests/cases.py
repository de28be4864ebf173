"""Random SRPO problems and a runner that returns the loss, the per-token outputs and every gradient."""
from __future__ import annotations

import torch

import srpo_kernels as sk
from srpo_kernels import reference

PER_TOKEN = ("logprobs", "entropy", "teacher_entropy", "divergence", "distill_weight")
FLOAT_ARGS = ("old_logprobs", "ref_logprobs", "is_weights")


def make_case(seed=0, n=37, h=16, v=203, sd_frac=0.5, mask_frac=0.2, bias=True, old=True, ref=False, isw=True,
              scale=1.0, shape=None, weight_grad=True):
    """A random problem in fp64; `shape` reshapes the tokens (e.g. (B, T))."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    hidden = torch.randn(n, h, generator=g, dtype=d)
    weight = scale * torch.randn(v, h, generator=g, dtype=d) / h ** 0.5 * 3
    token_ids = torch.randint(0, v, (n,), generator=g)
    route = torch.rand(n, generator=g) < sd_frac
    case = dict(hidden=hidden, weight=weight, token_ids=token_ids,
                advantages=torch.randn(n, generator=g, dtype=d), route=route,
                teacher_hidden=torch.randn(int(route.sum()), h, generator=g, dtype=d) if route.any() else None,
                loss_mask=torch.rand(n, generator=g) >= mask_frac,
                bias=torch.randn(v, generator=g, dtype=d) if bias else None)
    if old:
        case["old_logprobs"] = torch.randn(n, generator=g, dtype=d) * 0.3 - 5.0
    if ref:
        case["ref_logprobs"] = torch.randn(n, generator=g, dtype=d) * 0.3 - 5.0
    if isw:
        case["is_weights"] = torch.rand(n, generator=g, dtype=d) + 0.5
    if shape is not None:
        for k in ("token_ids", "advantages", "route", "loss_mask") + FLOAT_ARGS:
            if case.get(k) is not None:
                case[k] = case[k].reshape(shape)
        case["hidden"] = hidden.reshape(*shape, h)
    case["_weight_grad"] = weight_grad
    return case


# (side scaled 300x, alpha) of far_apart_case: each over 1.5x the 5x-naive bound before support.log_ratio, on the cpu
# or torch backend at least
FAR_APART = [("teacher", 0.0), ("teacher", 0.5), ("student", 0.5), ("student", 1.0)]


def far_apart_case(side):
    """Every row SDPO, one side's hidden states 300x the other's: its logits in the hundreds, the other's ~5."""
    case = make_case(seed=4, n=12, h=8, v=67, sd_frac=1.0, mask_frac=0.0, bias=False, old=False, isw=False)
    key = "teacher_hidden" if side == "teacher" else "hidden"
    case[key] = case[key] * 300.0
    return case


def run(fn, case, dtype=torch.float64, upstream_seed=123, upstream=None, **options):
    """Call `fn` (fused_srpo_loss or reference.srpo_loss) on `case` cast to `dtype`; returns a dict with the loss,
    per-token outputs, metrics and the gradients of hidden, weight, bias (fp64 for comparison). The loss takes
    `upstream` as its upstream gradient, or by default 1.7 (a scalar loss) or a random one from `upstream_seed`."""
    c = {k: v for k, v in case.items() if not k.startswith("_")}
    leaves = {}
    for k in ("hidden", "weight", "bias"):
        if c.get(k) is not None:
            t = c[k].detach().to(dtype)
            if k != "weight" or case["_weight_grad"]:
                t.requires_grad_(True)
            c[k] = leaves[k] = t
    if c.get("teacher_hidden") is not None:
        c["teacher_hidden"] = c["teacher_hidden"].to(dtype)
    for k in ("advantages",) + FLOAT_ARGS:
        if c.get(k) is not None:
            c[k] = c[k].to(torch.float64 if dtype == torch.float64 else torch.float32)
    args = [c.pop(k) for k in ("hidden", "weight", "token_ids", "advantages", "route", "teacher_hidden")]
    out = fn(*args, **c, **options)
    loss = out.loss
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed),
                               dtype=torch.float64) if loss.dim() else torch.tensor(1.7)
    upstream = upstream.to(loss.device, loss.dtype)
    wrt = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, upstream, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    res = {"loss": loss.detach().double(), "metrics": out.metrics, "clipped": out.clipped}
    for name in PER_TOKEN:
        res[name] = getattr(out, name).double()
    for name, grad in zip([k for k, t in leaves.items() if t.requires_grad], grads):
        res["grad_" + name] = None if grad is None else grad.double()
    return res


def rounded(case, dtype):
    """The case with its floating inputs rounded to `dtype` (kept fp64): the exact answer for what a low-precision
    run is actually given, so input rounding, shared by every implementation, does not blur the comparison."""
    out = dict(case)
    for k in ("hidden", "weight", "bias", "teacher_hidden"):
        if out.get(k) is not None:
            out[k] = out[k].to(dtype).double()
    return out


def fused(backend, **kw):
    return lambda *a, **k: sk.fused_srpo_loss(*a, **k, backend=backend, **kw)


ref_loss = reference.srpo_loss


def assert_bitwise_equal(actual, expected):
    """Every tensor of `expected` (a `run` result) equals `actual`'s bit for bit."""
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key


def max_rel_err(actual, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_agree(actual, expected, rtol=1e-5, keys=None, atol=1e-7, naive=None):
    """Every tensor of `expected` matches `actual` to `rtol` relative to its largest magnitude, plus `atol`
    (near-deterministic rows have entropies so small that only an absolute error makes sense). With `naive` (the
    naive reference's results in the same dtype as `actual`, from this run), the bound is at least 5x the naive
    error: fp32 against fp64 is then judged by what fp32 achieves on this CPU, not by a constant tuned on another."""
    for k in keys or expected:
        e, a = expected[k], actual[k]
        if k == "metrics":
            for m, ev in e.items():
                assert abs(a[m] - ev) <= rtol * max(1.0, abs(ev)) * 10, (m, a[m], ev)
            continue
        if e is None or a is None:
            assert e is None and a is None, k
            continue
        if e.dtype == torch.bool:
            assert torch.equal(a, e), k
            continue
        assert a.shape == e.shape, (k, a.shape, e.shape)
        err = float((a - e).abs().max()) if a.numel() else 0.0
        bound = rtol * (float(e.abs().max()) if e.numel() else 0.0) + atol
        if naive is not None and naive.get(k) is not None and e.numel():
            bound = max(bound, 5 * float((naive[k].to(e.dtype) - e).abs().max()))
        assert err <= bound, f"{k}: max error {err:.2e} > {bound:.2e} (rtol {rtol:.0e}, atol {atol:.0e})"


def naive_fp32(case, **options):
    """The materialising reference run in fp32 on `case`: the error any fp32 computation may have, measured here."""
    return run(ref_loss, case, dtype=torch.float32, **options)


def low_precision_errors(impl, dtype, seeds=range(8), keys=None, to_device=lambda c: c, **options):
    """Mean over `seeds` of the max relative error (vs fp64 on the same rounded inputs) of `impl` and of the naive
    reference, both run in `dtype`: {key: (ours, naive)}.

    Both round the same quantities (GEMM operands, and on the CPU the logits and dL/dz) to `dtype`, so their errors
    are draws from about the same distribution: one case can go either way by a factor of two, a mean over several
    cannot (ours is the lower one on average). `to_device` moves a case's tensors to the device `impl` runs on."""
    totals = {}
    for seed in seeds:
        case = make_case(seed=seed, n=45, h=32, v=301)
        truth = run(ref_loss, rounded(case, dtype), **options)
        naive = run(ref_loss, case, dtype=dtype, **options)
        ours = run(impl, to_device(case), dtype=dtype, **options)
        for k in keys or truth:
            if isinstance(truth[k], torch.Tensor) and truth[k].dtype == torch.float64:
                o, n = max_rel_err(ours[k].cpu(), truth[k]), max_rel_err(naive[k], truth[k])
                prev = totals.get(k, (0.0, 0.0))
                totals[k] = (prev[0] + o / len(seeds), prev[1] + n / len(seeds))
    return totals


def assert_fp32_no_worse_than_naive(impl, case, keys=None, to_device=lambda c: c, floor=1e-5, **options):
    """`impl` in fp32 is within max(floor, 5x the naive fp32 error) of fp64, for every output and gradient: the naive
    error is measured here, on this machine, so the bound holds on any CPU. Returns impl's results (on the CPU)."""
    truth = run(ref_loss, case, **options)
    naive = run(ref_loss, case, dtype=torch.float32, **options)
    ours = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
            for k, v in run(impl, to_device(case), dtype=torch.float32, **options).items()}
    for k in keys or truth:
        if isinstance(truth[k], torch.Tensor) and truth[k].dtype == torch.float64:
            assert torch.isfinite(ours[k]).all(), f"{k}: not finite"
            if float(truth[k].abs().max()) < 1e-12:
                # A vanishing output is rounding noise even in fp64 (dh of a row whose target holds all but 1e-19 of
                # the mass: autograd's 1 - p cancels; of twin top logits: w_target - sum p w cancels), so only an
                # absolute bound means anything, and fp32 noise scales with the terms that cancel: 5x naive's.
                got, naive_got = float(ours[k].abs().max()), float(naive[k].abs().max())
                assert got <= max(1e-9, 5 * naive_got), f"{k}: {got:.2e} where fp64 says ~0 (naive {naive_got:.2e})"
                continue
            err, naive_err = max_rel_err(ours[k], truth[k]), max_rel_err(naive[k], truth[k])
            assert err <= max(floor, 5 * naive_err), f"{k}: {err:.2e} vs naive fp32 {naive_err:.2e}"
    return ours


def near_topk_tie(case, opts) -> bool:
    """fp32 and fp64 may order two logits closer than fp32 resolves differently at the top-K boundary, which changes
    the support itself (exact ties are broken by the id rule, the same everywhere)."""
    k, v = opts.get("topk"), case["weight"].shape[0]
    z = (case["hidden"] @ case["weight"].T).reshape(-1, v)
    if k is None or k >= v or not len(z):
        return False
    if case.get("bias") is not None:
        z = z + case["bias"]
    top = z.topk(k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k]).abs()
    return bool(((gap > 0) & (gap < 1e-4 * top[:, 0].abs().clamp_min(1.0))).any())
