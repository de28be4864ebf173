"""Backend choice and the C++ row passes against the PyTorch ones on awkward rows."""
import math
import os
import subprocess
import sys

import pytest
import torch

from srpo_kernels.backends import get_row_ops
from srpo_kernels.backends import row_ops as S
from srpo_kernels.backends.cpu import CpuRowOps, load_error
from srpo_kernels.backends.torch_chunked import torch_row_ops


def test_auto_picks_cpu_kernel_for_cpu_fp32_and_torch_for_fp64():
    assert load_error() is None, load_error()
    assert get_row_ops("auto", torch.device("cpu")).name == "cpu"
    assert get_row_ops("auto", torch.device("cpu"), torch.float64).name == "torch"
    assert get_row_ops("torch", torch.device("cpu")).name == "torch"


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' is unavailable: .*(CUDA|not installed)"):
        get_row_ops("triton", torch.device("cpu"))


def test_auto_falls_back_with_a_warning_when_the_kernel_is_unavailable():
    code = ("import warnings, torch, srpo_kernels as sk\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    lp = sk.fused_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]))\n"
            "print(len(w), str(w[0].message))\n")
    env = dict(os.environ, SRPO_KERNELS_DISABLE_CPU="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("1 ") and "chunked PyTorch backend" in out


_WAIT_AND_LOAD = """
import glob, os, time
from srpo_kernels.backends import cpu
print("imported", flush=True)
while not glob.glob(os.path.join(os.environ["SRPO_KERNELS_CACHE"], "cpu-*", "srpo_kernels_cpu.so")):
    time.sleep(0.001)
print("loaded:", cpu.load_error(), flush=True)
"""


def test_a_process_started_while_the_kernel_links_loads_the_finished_kernel(tmp_path):
    """A fresh cache, and a second process that asks for the kernel the moment the library file appears (the
    linker is still writing it: several ranks of one job starting at once). It loaded the half-written file and
    lost the kernel for its lifetime; it must wait for the build. (About 15 s: one compile.)"""
    env = dict(os.environ, SRPO_KERNELS_CACHE=str(tmp_path))
    waiter = subprocess.Popen([sys.executable, "-c", _WAIT_AND_LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert waiter.stdout.readline().strip() == "imported"
        subprocess.run([sys.executable, "-c", "from srpo_kernels.backends import cpu; assert cpu.load_error() is None"],
                       env=env, check=True, capture_output=True, timeout=600)
        out = waiter.communicate(timeout=600)[0]
    finally:
        waiter.kill()
    assert "loaded: None" in out, out


def _rows(seed, c=6, v=1031, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, v, generator=g) * scale
    u = torch.randn(c, v, generator=g) * scale
    z[0, 5] = 60.0  # one near-certain token
    u[1] = z[1]  # identical teacher
    z[2, :] = 0.0  # uniform student (ties everywhere)
    return z, u, torch.randint(0, v, (c,), generator=g)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk,tail", [(None, True), (20, True), (20, False)])
def test_cpu_row_passes_match_torch(alpha, topk, tail):
    z, u, y = _rows(0)
    cpu, ref = CpuRowOps(), torch_row_ops()
    u_cpu = u.clone()  # distill_stats may leave private data in u for distill_grad
    s_cpu, ids_cpu = cpu.distill_stats(z.clone(), u_cpu, y, alpha, topk, tail)
    s_ref, ids_ref = ref.distill_stats(z.clone(), u.clone(), y, alpha, topk, tail)
    # Row 2 is uniform: its top-K is a tie, any K ids are right and the teacher's support values differ.
    rows = [0, 1, 3, 4, 5] if topk else list(range(6))
    n = S.N_DISTILL_STATS  # a backend may append private columns after the named ones
    assert torch.allclose(s_cpu[rows, :n], s_ref[rows, :n], rtol=1e-5, atol=1e-5)
    if topk:
        assert torch.equal(ids_cpu[rows].sort(1).values, ids_ref[rows].sort(1).values)
    c_logp, c_div = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    g_cpu, g_ref = z.clone(), z.clone()
    cpu.distill_grad(g_cpu, u_cpu, y, s_cpu, ids_cpu, c_logp, c_div, alpha, topk, tail)
    ref.distill_grad(g_ref, u, y, s_ref, ids_ref, c_logp, c_div, alpha, topk, tail)
    assert torch.allclose(g_cpu[rows], g_ref[rows], rtol=1e-4, atol=1e-6)
    assert torch.allclose(g_cpu.sum(1), torch.zeros(6), atol=1e-5)  # shift invariance


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk,tail", [(None, True), (20, True)])
def test_cpu_distill_grad_rounds_log_probs_at_their_own_size(alpha, topk, tail):
    """Logits far from 0 (here 1000 + N(0, 1), exact in fp32): exp(x - lse) would round every p at |lse| (6e-5 in
    relative terms); (x - max) - log s rounds it as log_softmax does. Judged against the torch backend in fp32 (the
    shifted form throughout), both against fp64 on the same fp32 logits."""
    z, u, y = _rows(5, scale=1.0)
    z += 1000.0
    c_logp, c_div = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    grads = {}
    for name, ops, dtype in (("cpu", CpuRowOps(), torch.float32), ("torch", torch_row_ops(), torch.float32),
                             ("fp64", torch_row_ops(), torch.float64)):
        zz, uu = z.to(dtype), u.to(dtype).clone()  # the cpu stats pass leaves its scratch in u
        stats, ids = ops.distill_stats(zz.clone(), uu, y, alpha, topk, tail)
        g = zz.clone()
        ops.distill_grad(g, uu, y, stats, ids, c_logp.to(dtype), c_div.to(dtype), alpha, topk, tail)
        grads[name] = g.double()
    err = {k: float((grads[k] - grads["fp64"]).abs().max()) for k in ("cpu", "torch")}
    assert err["cpu"] <= max(1e-7, 5 * err["torch"]), err


def test_cpu_sums_over_a_long_row_keep_their_digits():
    """Rows of V = 151 936 (logits of std 3.5): one fp32 sum per lane (9,500 terms each) put the C++ log-sums and
    entropies 6x the torch backend's error from fp64 here (60x on the logits of a fused-loss case; torch's sums
    cascade). Blocks of fp32 lanes summed in double keep them within a small factor of it; both judged against
    fp64 on the same fp32 logits."""
    g = torch.Generator().manual_seed(3)
    z, u = (3.5 * torch.randn(2, 4, 151_936, generator=g)).unbind(0)
    y = torch.randint(0, z.shape[1], (4,), generator=g)
    cols = (S.LSE, S.LOGP, S.ENTROPY, S.T_LSE, S.T_ENTROPY)
    stats = {name: ops.distill_stats(z.to(dtype), u.to(dtype).clone(), y, 0.5, None, True)[0][:, cols].double()
             for name, ops, dtype in (("cpu", CpuRowOps(), torch.float32), ("torch", torch_row_ops(), torch.float32),
                                      ("fp64", torch_row_ops(), torch.float64))}
    err = {k: float(((stats[k] - stats["fp64"]) / stats["fp64"].abs()).abs().max()) for k in ("cpu", "torch")}
    assert err["cpu"] <= max(1e-7, 3 * err["torch"]), err


def teacher_entropy_error(ops, topk, tail, seed, v=1000):
    """(max error of the backend's fp64 teacher entropy, max error of fp32's own rounding of the exact one), both
    against the fp64 torch backend on the same fp32 logits: flat to sharp rows."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.05, 4.0, 48)[:, None]
    z, u = torch.randn(48, v, generator=g) * scale, torch.randn(48, v, generator=g) * scale
    y = torch.randint(0, v, (48,), generator=g)
    exact = S.teacher_entropy(torch_row_ops().distill_stats(z.double(), u.double(), y, 0.5, topk, tail)[0])
    ours = S.teacher_entropy(ops.distill_stats(z.clone(), u.clone(), y, 0.5, topk, tail)[0])
    return float((ours - exact).abs().max()), float((exact.float().double() - exact).abs().max())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("topk", [None, 5], ids=["full", "top5_renormalised"])
def test_teacher_entropy_is_as_good_as_rounded_fp32(backend, seed, topk):
    """The weight exp(-beta H_T) multiplies H_T's error by beta: an fp32 ulp of H_T ~ 5 (4.8e-7) is 2.4e-5 of a weight
    at beta = 50. An fp32 H_T computed in fp32 carried its own errors and then its rounding (3.2-4.1x fp32's own
    rounding of the exact value on the C++ backend's full vocabulary, 2.1-2.6x on the torch backend's); the stats
    now carry the entropy's low part (row_ops.T_ENTROPY_LO), computed in double from the passes' fp32 sums. The
    per-entry fp32 roundings (x - m, exp) remain: within 2x that rounding here, exact over a renormalised top-K."""
    ops = CpuRowOps() if backend == "cpu" else torch_row_ops()
    err, fp32_rounding = teacher_entropy_error(ops, topk, topk is None, seed=seed)
    assert err <= 2 * fp32_rounding, (err, fp32_rounding)


@pytest.mark.parametrize("alpha,teacher_masked", [(0.0, slice(0, 7)), (1.0, slice(0, 7)), (0.5, slice(5, 12))])
def test_cpu_row_passes_handle_minus_inf_logits(alpha, teacher_masked):
    """Vocabulary entries masked with -inf (e.g. by the bias) have zero probability and contribute nothing."""
    z, u, y = _rows(2)
    z[:, :7] = -math.inf
    u[:, teacher_masked] = -math.inf
    y = y.clamp_min(12)  # targets on unmasked entries
    cpu, ref = CpuRowOps(), torch_row_ops()
    u_cpu = u.clone()
    s_cpu, _ = cpu.distill_stats(z.clone(), u_cpu, y, alpha, None, True)
    s_ref, _ = ref.distill_stats(z.clone(), u.clone(), y, alpha, None, True)
    n = S.N_DISTILL_STATS
    assert torch.isfinite(s_cpu[:, :n]).all() and torch.allclose(s_cpu[:, :n], s_ref[:, :n], rtol=1e-5, atol=1e-5)
    c_logp, c_div = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    g_cpu, g_ref = z.clone(), z.clone()
    cpu.distill_grad(g_cpu, u_cpu, y, s_cpu, None, c_logp, c_div, alpha, None, True)
    ref.distill_grad(g_ref, u, y, s_ref, None, c_logp, c_div, alpha, None, True)
    assert torch.isfinite(g_cpu).all() and torch.allclose(g_cpu, g_ref, rtol=1e-4, atol=1e-6)
    assert (g_cpu[:, :7] == 0).all()


@pytest.mark.parametrize("masked", [False, True], ids=["finite", "minus_inf"])
def test_cpu_student_passes_match_torch(masked):
    z, _, y = _rows(1)
    if masked:  # vocabulary entries masked with -inf: zero probability, zero gradient
        z[:, :7] = -math.inf
        y = y.clamp_min(7)
    cpu, ref = CpuRowOps(), torch_row_ops()
    s_cpu, s_ref = cpu.student_stats(z, y), ref.student_stats(z, y)
    n = S.N_STUDENT_STATS
    assert torch.allclose(s_cpu[:, :n], s_ref[:, :n], rtol=1e-5, atol=1e-6)
    c_logp, c_ent = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    g_cpu, g_ref = z.clone(), z.clone()
    cpu.student_grad(g_cpu, y, s_cpu, c_logp, c_ent)
    ref.student_grad(g_ref, y, s_ref, c_logp, c_ent)
    assert torch.isfinite(g_cpu).all() and torch.isfinite(g_ref).all()
    assert float((g_cpu - g_ref).abs().max()) <= 1e-5 * float(g_ref.abs().max())


def test_topk_ties_go_to_the_lowest_ids_in_every_backend():
    """Duplicated vocabulary rows give tied logits: the support (and so the gradient) must pick the same twin in the
    C++ kernel, the torch backend and the reference."""
    from srpo_kernels.backends.support import topk_ids

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 400, generator=g)
    z[:, 200:] = z[:, :200]  # every value twice
    z[1] = 0.0  # a row of one value: the first k ids
    k = 7
    expected = []
    for row in z:
        order = sorted(range(400), key=lambda j: (-float(row[j]), j))
        expected.append(sorted(order[:k]))
    assert [sorted(r) for r in topk_ids(z, k).tolist()] == expected
    u = torch.randn(5, 400, generator=g)
    targets = torch.zeros(5, dtype=torch.long)
    for ops in (torch_row_ops(), CpuRowOps()):
        _, ids = ops.distill_stats(z.clone(), u.clone(), targets, 0.5, k, True)
        assert [sorted(r) for r in ids.tolist()] == expected, ops.name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(temperature=0.5), dict(topk=9, alpha=1.0),
                                     dict(reduction="none")],
                         ids=str)
def test_cpu_kernel_casts_rows_in_place_of_the_chunk_loops_passes(dtype, options, monkeypatch):
    """bf16 GEMMs on the CPU: the C++ passes widen each row ((x + b) / T) and narrow its dL/dz themselves
    (RowOps.fuses_casts). Same arithmetic as the chunk loop's separate passes, so the same bits; at T = 0.5 those
    multiply by the exact 1/T where the C++ divides, which gives the same quotients. fp16 never fuses: its dL/dz
    takes a scale from the whole chunk before it is narrowed (gemm.Gemms.fp16_grad_scale)."""
    from cases import assert_bitwise_equal, fused, make_case, run
    from srpo_kernels import chunk_loop, gemm

    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: True)  # the bf16-GEMM path, whatever this CPU has
    case = make_case(seed=4, n=45, v=301)  # with a bias; 45 rows in chunks of 16: a partial chunk in each stream
    loss = fused("cpu", chunk_size=16)
    seen = []
    original = chunk_loop.ChunkRunner._logits
    monkeypatch.setattr(chunk_loop.ChunkRunner, "_logits",
                        lambda self, *a, **k: (seen.append(self.fused_casts), original(self, *a, **k))[1])
    fused_run = run(loss, case, dtype, **options)
    assert seen and all(seen) == (dtype == torch.bfloat16)  # the fused path did run, for bf16
    monkeypatch.setattr(CpuRowOps, "fuses_casts", False)
    separate = run(loss, case, dtype, **options)
    assert_bitwise_equal(separate, fused_run)
