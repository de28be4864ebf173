"""gemm.py: the GEMM precision policy's dW accumulation, on the CPU's low-precision path (forced here whatever
this CPU has: the result does not depend on the hardware, only the speed does)."""
import functools

import pytest
import torch

from cases import max_rel_err
from srpo_kernels import gemm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.37])
@pytest.mark.parametrize("alpha", [1.0, 2.0 ** -9])  # alpha: what undoes an fp16 dL/dz's scale
@pytest.mark.parametrize("add", ["fp32_acc_gemm", "c++ blocks", "torch blocks"])
def test_low_precision_dw_accumulates_in_fp32(dtype, beta, alpha, add, monkeypatch):
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)
    if add == "torch blocks":  # the fallback where the C++ kernel is not built
        monkeypatch.setattr(gemm.cpu_kernel, "load_error", lambda: "disabled")
    elif gemm.cpu_kernel.load_error() is not None:
        pytest.skip(f"the C++ CPU kernel is unavailable: {gemm.cpu_kernel.load_error()}")
    elif add == "c++ blocks":  # where torch's CPU build has no MKL, or the CPU is not Intel's
        monkeypatch.setenv("SRPO_KERNELS_CPU_DW", "blocks")
    elif not torch.ops.srpo_kernels.grad_weight_available():
        pytest.skip("torch's CPU build has no MKL bf16/fp16 GEMM here")
    else:
        monkeypatch.setenv("SRPO_KERNELS_CPU_DW", "mkl")
    monkeypatch.setattr(gemm, "DW_BLOCK_ELEMENTS", 1)  # 64-row blocks: V = 203 takes four, the last one partial
    g = torch.Generator().manual_seed(0)
    v, h_dim, c = 203, 24, 37
    weight = torch.randn(v, h_dim, generator=g).to(dtype)
    gemms = gemm.Gemms(weight, None, 1.0)
    assert gemms.low and not gemms.fp32_out  # the CPU path
    dz = torch.randn(c, v, generator=g)
    h = torch.randn(c, h_dim, generator=g).to(dtype)
    dz_op, _ = gemms.narrow(dz, torch.empty(c, v, dtype=dtype), h)
    before = torch.randn(v, h_dim, generator=g)
    acc = before.clone() if beta else torch.full((v, h_dim), float("nan"))  # beta 0: unwritten, NaN ignored
    gemms.add_grad_weight(acc, dz_op, h, beta, alpha)

    part = alpha * (dz_op.double().T @ h.double())
    expected = beta * before.double() + part
    # Each block's share is rounded once to the input dtype, as the naive loss rounds its dW (then fp32 adds).
    eps = torch.finfo(dtype).eps
    bound = eps * part.abs() + 4 * torch.finfo(torch.float32).eps * (expected.abs() + part.abs())
    assert torch.isfinite(acc).all()
    if add == "fp32_acc_gemm":  # no share rounded to bf16/fp16: fp32 sums of exact products
        magnitude = beta * before.double().abs() + alpha * (dz_op.double().abs().T @ h.double().abs())
        bound = 4 * c * torch.finfo(torch.float32).eps * magnitude
    assert ((acc.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("vendor, choice, expected", [
    ("GenuineIntel", "auto", True), ("AuthenticAMD", "auto", False), ("", "auto", False),
    ("AuthenticAMD", "mkl", True), ("GenuineIntel", "blocks", False)])
def test_mkl_dw_gemm_only_on_intel_unless_forced(vendor, choice, expected, monkeypatch):
    monkeypatch.setattr(gemm, "_cpuinfo", lambda *keys: vendor if keys == ("vendor_id",) else "")
    monkeypatch.setenv("SRPO_KERNELS_CPU_DW", choice)
    assert gemm.mkl_dw_gemm_preferred() is expected


def test_cpu_dw_choice_is_validated(monkeypatch):
    monkeypatch.setenv("SRPO_KERNELS_CPU_DW", "fast")
    with pytest.raises(ValueError, match="SRPO_KERNELS_CPU_DW must be auto, mkl or blocks"):
        gemm.mkl_dw_gemm_preferred()
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)
    with pytest.raises(ValueError, match="SRPO_KERNELS_CPU_DW"):  # once a call, before any GEMM
        gemm.Gemms(torch.zeros(8, 4, dtype=torch.bfloat16), None, 1.0)


def _needs_cpu_kernel():
    if gemm.cpu_kernel.load_error() is not None:
        pytest.skip(f"the C++ CPU kernel is unavailable: {gemm.cpu_kernel.load_error()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("discard", [True, False])
def test_returned_grad_is_the_plain_cast(dtype, scale, discard, monkeypatch):
    """Narrowing block by block (blocks that are not whole pages, the last one partial) gives the bits of one cast."""
    if discard:
        _needs_cpu_kernel()
        monkeypatch.setattr(gemm, "DISCARD_MIN_BYTES", 0)
        monkeypatch.setattr(gemm, "NARROW_BLOCK_BYTES", 4 * 1001)
    acc = torch.randn(157, 83, generator=torch.Generator().manual_seed(1)) * 100
    s = None if scale is None else torch.tensor(scale)
    expected = (acc if s is None else acc * s).to(dtype)
    got = gemm.returned_grad(acc.clone(), dtype, s)
    assert got.dtype == dtype and got.shape == acc.shape
    assert torch.equal(got, expected)


def test_discard_pages_touches_only_whole_pages_inside():
    """Pages wholly inside the slice read as zeros after it; every entry on a page shared with its neighbours keeps
    its value (the allocator's or another tensor's data may live there)."""
    import resource
    import sys

    _needs_cpu_kernel()
    page = resource.getpagesize()
    t = torch.arange(1, 8 * page + 1, dtype=torch.float32)  # 4 bytes an entry: 4 pages of entries after the slice
    start, stop = 37, 4 * page - 5
    torch.ops.srpo_kernels.discard_pages(t[start:stop])
    addr = t.data_ptr() + 4 * torch.arange(t.numel(), dtype=torch.int64)
    lo = -(-(t.data_ptr() + 4 * start) // page) * page  # first whole page inside the slice
    hi = (t.data_ptr() + 4 * stop) // page * page
    inside = (addr >= lo) & (addr + 4 <= hi)
    kept = torch.arange(1, 8 * page + 1, dtype=torch.float32)
    if sys.platform.startswith("linux"):
        assert inside.any()
        assert (t[inside] == 0).all()
    assert torch.equal(t[~inside], kept[~inside])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fp16_logits_beyond_fp16_range_are_computed_in_fp32(backend, monkeypatch):
    """The CPU's fp16 GEMM accumulates in fp32 but writes fp16: logits past 65 504 came out inf, then NaN log-probs
    and NaN or inf gradients beside a finite loss. Where |h| |w| can reach fp16's range the GEMMs widen instead."""
    import srpo_kernels as sk

    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)  # the fp16-GEMM path, whatever this CPU has
    g = torch.Generator().manual_seed(0)
    hidden = (100 * torch.randn(6, 16, generator=g)).half()
    weight = (100 * torch.randn(50, 16, generator=g)).half()
    ids = torch.randint(0, 50, (6,), generator=g)
    assert (hidden.double() @ weight.double().T).abs().max() > torch.finfo(torch.float16).max

    def may_overflow(w, h, absmax=None):  # absmax: the maxima the finiteness scan hands over (default: the true ones)
        return gemm.fp16_logits_may_overflow(w, [h], *(absmax or (float(w.abs().max()), float(h.abs().max()))))

    assert may_overflow(weight, hidden)
    assert not may_overflow(weight / 100, hidden / 100)  # the usual case keeps fp16 GEMMs (the free bound clears)
    assert not may_overflow(weight / 100, hidden / 100, absmax=(1e3, 1e3))  # where it does not, |h|_2 |w|_2 can
    assert not may_overflow(weight.bfloat16(), hidden.bfloat16())  # bf16 has fp32's range
    grads = {}
    outs = {}
    for dtype in (torch.float16, torch.float32):  # the fp16 call must be the fp32 GEMMs' on the same values
        h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        outs[dtype] = sk.fused_srpo_loss(h, w, ids, torch.linspace(-1, 1, 6), old_logprobs=torch.zeros(6),
                                         backend=backend)
        outs[dtype].loss.backward()
        grads[dtype] = h.grad, w.grad
    assert torch.isfinite(outs[torch.float16].logprobs).all()
    assert torch.equal(outs[torch.float16].logprobs, outs[torch.float32].logprobs)
    for ours, wide in zip(grads[torch.float16], grads[torch.float32]):
        assert torch.isfinite(ours).all() and torch.equal(ours, wide.half())


def _fp16_grads(loss_fn, hidden, weight, dtype, upstream, **inputs):
    h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
    (loss_fn(h, w, **inputs).loss * upstream).backward()
    return h.grad.double() / upstream, w.grad.double() / upstream


@pytest.mark.parametrize("dw", ["mkl", "blocks"])
def test_fp16_grad_under_a_grad_scaler_is_as_precise_as_the_naive_loss(dw, monkeypatch):
    """A mean over N tokens makes dL/dz ~1/N: in fp16 mostly subnormal. torch.amp's GradScaler lifts the naive
    loss's dL/dz by its factor; ours is computed in the forward, without it, and lost its digits (dh 2x, dW 4x the
    naive error at N = 4096, growing with N). Now each chunk's fp16 dL/dz is scaled by a power of two first."""
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)  # the fp16-GEMM path, whatever this CPU has
    if dw == "mkl" and (gemm.cpu_kernel.load_error() is not None
                        or not torch.ops.srpo_kernels.grad_weight_available()):
        pytest.skip("torch's CPU build has no MKL fp16 GEMM with an fp32 C here")
    monkeypatch.setenv("SRPO_KERNELS_CPU_DW", dw)
    import srpo_kernels as sk

    g = torch.Generator().manual_seed(0)
    n, h_dim, v = 4096, 32, 1000
    hidden = torch.randn(n, h_dim, generator=g).half()
    weight = (0.3 * torch.randn(v, h_dim, generator=g)).half()
    route = torch.rand(n, generator=g) < 0.5
    inputs = dict(token_ids=torch.randint(0, v, (n,), generator=g), advantages=torch.randn(n, generator=g),
                  route=route, teacher_hidden=torch.randn(int(route.sum()), h_dim, generator=g).half())
    truth = _fp16_grads(sk.reference.srpo_loss, hidden, weight, torch.float64, 1.0, **inputs)
    naive = _fp16_grads(sk.reference.srpo_loss, hidden, weight, torch.float16, 65536.0, **inputs)
    ours = _fp16_grads(functools.partial(sk.fused_srpo_loss, backend="cpu"), hidden, weight, torch.float16, 65536.0,
                       **inputs)
    for name, o, n_, t in zip(("dh", "dW"), ours, naive, truth):
        err, naive_err = max_rel_err(o, t), max_rel_err(n_, t)
        # dW by blocks rounds each chunk's share to fp16 (the design), the fp32-C GEMM does not
        assert err <= (1.5 if name == "dW" and dw == "blocks" else 1.1) * naive_err, (name, err, naive_err)


def test_fp16_grad_beyond_fp16_is_scaled_down_not_inf(monkeypatch):
    """dL/dz past 65 504 (A = 3e4 at T = 0.1, summed) overflowed fp16 when it was narrowed: inf and NaN gradients,
    though dh and dW themselves are well inside fp16 (small hidden and weight). The scale is below 1 there."""
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)
    import srpo_kernels as sk

    g = torch.Generator().manual_seed(1)
    hidden, weight = (1e-3 * torch.randn(6, 8, generator=g)).half(), (1e-3 * torch.randn(20, 8, generator=g)).half()
    inputs = dict(token_ids=torch.randint(0, 20, (6,), generator=g), advantages=torch.full((6,), 3e4),
                  temperature=0.1, reduction="sum")
    truth = _fp16_grads(sk.reference.srpo_loss, hidden, weight, torch.float64, 1.0, **inputs)
    for backend in ("cpu", "torch"):
        ours = _fp16_grads(functools.partial(sk.fused_srpo_loss, backend=backend), hidden, weight, torch.float16, 1.0,
                           **inputs)
        for o, t in zip(ours, truth):
            assert torch.isfinite(o).all() and max_rel_err(o, t) < 1e-2, backend


def test_fp16_gemms_take_the_maxima_of_the_finiteness_scan(monkeypatch):
    """The bounds of the CPU's fp16 GEMM outputs use max |W| and max |h| from the input checks' scan: W is not read
    again for them (it was, once per call and per recompute)."""
    import srpo_kernels as sk

    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)  # the fp16-GEMM path, whatever this CPU has
    monkeypatch.setattr(gemm, "_absmax", lambda t: pytest.fail("a maximum was computed again"))
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 8, generator=g).half().requires_grad_()
    weight = torch.randn(20, 8, generator=g).half().requires_grad_()
    ids, route = torch.randint(0, 20, (6,), generator=g), torch.tensor([True, False] * 3)
    for backend in ("cpu", "torch"):
        out = sk.fused_srpo_loss(hidden, weight, ids, 1.0, route, torch.randn(3, 8, generator=g).half(),
                                 reduction="none", backend=backend)
        out.loss.sum().backward()  # "none" recomputes the chunks in backward: a second Gemms
        sk.fused_logprobs(hidden, weight, ids, backend=backend).sum().backward()
