"""Every benchmarked variant, built once for all suites (CPU pytest-benchmark, GPU script, memory, report).

A variant is a zero-argument callable running forward+backward; peers run only on the routing they cover, with
our options set so that each computes the same loss as ours (checked in tests/test_bench_variants.py).
"""
from __future__ import annotations

import torch

import srpo_kernels as sk

SHAPES = {"small": (1024, 256, 32_000), "smollm2": (2048, 576, 49_152), "qwen3": (2048, 1024, 151_936)}
ROUTINGS = {"grpo": 0.0, "half": 0.5, "sdpo": 1.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQUENCES = 8  # tokens are B = 8 sequences of N / 8, one advantage each (Liger's GRPO takes them per sequence)


def make_inputs(n, h, v, sd_frac, dtype=torch.float32, device="cpu", seed=0):
    """(hidden, weight, token_ids, advantages, route, teacher_hidden); hidden and weight require grad."""
    if n % SEQUENCES:
        raise ValueError(f"N must be a multiple of {SEQUENCES}, got {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(SEQUENCES, generator=g).repeat_interleave(n // SEQUENCES).to(device)
    if sd_frac in (0.0, 1.0):
        route = torch.full((n,), sd_frac == 1.0, device=device)
    else:
        route = (torch.rand(n, generator=g) < sd_frac).to(device)
    teacher = torch.randn(int(route.sum()), h, generator=g).to(device, dtype)
    return hidden, weight, ids, adv, route, teacher


def _step(loss_fn, hidden, weight):
    def run():
        loss = loss_fn()
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.detach()
    return run


def peer_matched_options(route) -> dict:
    """Our options on the routings peers cover: they have no dual clip (GRPO) and no entropy weights (SDPO)."""
    return dict(dual_clip=None, entropy_beta=0.0) if (not bool(route.any()) or bool(route.all())) else {}


def losses(hidden, weight, ids, adv, route, teacher, backends=("cpu", "torch"), compiled=True):
    """name -> zero-argument callable returning the (differentiable) loss."""
    all_grpo, all_sdpo = not bool(route.any()), bool(route.all())
    opts = peer_matched_options(route)
    out = {f"fused {b}": (lambda b=b: sk.fused_srpo_loss(hidden, weight, ids, adv, route, teacher, backend=b,
                                                         **opts).loss) for b in backends}
    out["reference"] = lambda: sk.reference.srpo_loss(hidden, weight, ids, adv, route, teacher, **opts).loss
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss
    except ImportError:
        LigerFusedLinearGRPOLoss = LigerFusedLinearJSDLoss = None
    if all_grpo and LigerFusedLinearGRPOLoss is not None:
        grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=0.2,
                                        epsilon_high=0.28, compiled=compiled)
        t = ids.numel() // SEQUENCES
        mask = torch.ones_like(ids).view(SEQUENCES, t)
        out["liger GRPO"] = lambda: grpo(hidden.view(SEQUENCES, t, -1), weight, ids.view(SEQUENCES, t), mask,
                                         adv[::t])[0]
    if all_sdpo:
        if LigerFusedLinearJSDLoss is not None:
            for flag in ((True, False) if compiled else (False,)):
                jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=flag)
                out[f"liger JSD{'' if flag else ' (eager)'}"] = lambda jsd=jsd: jsd(hidden, weight, teacher, weight,
                                                                                     ids)
        try:
            from trl.experimental.sdpo.loss_utils import compute_full_logit_self_distillation_loss as trl_sdpo
        except ImportError:
            trl_sdpo = None
        if trl_sdpo is not None:
            out["trl SDPO"] = lambda: trl_sdpo(hidden @ weight.T, (teacher @ weight.T).detach(),
                                               distillation_alpha=0.5).mean()
    return out


def steps(inputs, **kw):
    """name -> forward+backward callable, plus "gemm floor": the matmuls alone for the same shapes and routing
    (student forward, dhidden, dW, and the teacher forward over the SDPO rows), as a naive loss runs them, each
    into a fresh output; and "gemm floor, outputs kept": the same matmuls into outputs allocated by the first call,
    the GEMMs alone. The difference is mostly the page faults of fresh [N, V] memory (a fifth of the floor at the
    small shape in bf16 on 2 AMD EPYC cores); the fused loss pays them only for its [C, V] workspace."""
    hidden, weight, _, _, _, teacher = inputs
    out = {name: _step(fn, hidden, weight) for name, fn in losses(*inputs, **kw).items()}
    h, w = hidden.detach(), weight.detach()

    def floor():
        z = h @ w.T
        _ = z @ w, z.T @ h, teacher @ w.T
    out["gemm floor"] = floor

    kept = []

    def floor_outputs_kept():
        if not kept:
            kept.extend([h @ w.T, torch.empty_like(h), torch.empty_like(w), teacher @ w.T])
        z, dh, dw, u = kept
        torch.mm(h, w.T, out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.T, h, out=dw)
        torch.mm(teacher, w.T, out=u)
    out["gemm floor, outputs kept"] = floor_outputs_kept
    return out
