"""The chunk loop: GEMMs around a backend's row passes, never holding more than ``[C, V]`` logits.

Rows are processed in two streams: the SDPO-routed rows (student and teacher logits side by side), then the GRPO
rows. SDPO goes first so that the entropy-weight normaliser ``mean(exp(-beta H_T))``, known only once every teacher
row has been seen, can be applied to the SDPO gradients already accumulated by one rescale, before any GRPO row adds
to the same ``dW``. Within a stream, valid rows come first, so chunks of masked rows skip the gradient GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import token_math
from .backends import row_ops as S
from .backends.row_ops import RowOps
from .config import SRPOLossConfig
from .distributed import all_reduce_sums
from .inputs import FlatInputs

CHUNK_BYTES = 128 << 20  # cap on one fp32 [C, V] logits buffer (the SDPO stream's stacked buffer is twice this)


def default_chunk_size(vocab: int, hidden: int) -> int:
    """Rows per chunk: about H (at least 256), within CHUNK_BYTES, in [16, 4096] and a multiple of 16.

    Each chunk streams W (V x H) through three GEMMs, and its logits (C x V) through the GEMMs and the row passes;
    C ~ H keeps W's share of that traffic below the logits'. Smaller chunks re-read W (and pay the per-chunk
    overhead more often); larger ones fall out of cache and cost memory. Measured on 2 Sapphire Rapids cores
    (``python -m benchmarks.floor_ratio --chunk-sizes ...``): best near C = 256 for H = 256, C >= 336 for H = 576;
    for H = 1024, V = 151 936 (all SDPO) 1.46x the GEMM floor at C = 96, 1.16x at 208 (this cap), 1.10x at 256,
    where the workspace would push the peak memory past a tenth of the materialising reference's.
    """
    rows = min(max(hidden, 256), CHUNK_BYTES // (4 * vocab))
    return max(16, min(4096, rows // 16 * 16))


@dataclass
class RowStats:
    """Per-token results of the vocabulary passes (fp32/fp64, length N; zeros where a branch does not apply)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    divergence: torch.Tensor


@dataclass
class Grads:
    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]  # fp32 accumulator whatever the input dtype; its value is weight_scale * weight
    bias: Optional[torch.Tensor]
    # A pending factor on the weight accumulator, folded into the next GEMM's beta: 0 means "not written yet" (the
    # buffer is uninitialised, so no pass zeroes V x H), and a rescale costs no pass over V x H either.
    weight_scale: float = 0.0

    def scale_(self, factor: float, hidden_rows) -> None:
        """Multiply everything accumulated so far by `factor` (hidden only on `hidden_rows`)."""
        if self.hidden is not None:
            self.hidden[hidden_rows] *= factor
        if self.bias is not None:
            self.bias.mul_(factor)
        self.weight_scale *= factor

    def finalize_(self) -> None:
        if self.weight is not None and self.weight_scale != 1.0:
            if self.weight_scale == 0.0:
                self.weight.zero_()
            else:
                self.weight.mul_(self.weight_scale)
        self.weight_scale = 1.0


class ChunkRunner:
    """Runs the chunk loop over flat inputs with one backend; keeps the fp32 views of the operands."""

    def __init__(self, x: FlatInputs, cfg: SRPOLossConfig, ops: RowOps, chunk_size: Optional[int]):
        self.x, self.cfg, self.ops = x, cfg, ops
        dtype = x.math_dtype
        self.dtype = dtype
        self.hidden = x.hidden.detach().to(dtype)
        self.weight = x.weight.detach().to(dtype)
        self.bias = None if x.bias is None else x.bias.detach().to(dtype)
        self.vocab = self.weight.shape[0]
        self.chunk = chunk_size or default_chunk_size(self.vocab, self.weight.shape[1])
        self.inv_t = 1.0 / cfg.temperature
        route, valid = x.route, x.valid
        # Valid rows first inside each stream (stable, so teacher rows stay aligned with their tokens).
        sd_rows = route.nonzero().squeeze(1)
        sd_order = torch.argsort((~valid[sd_rows]).to(torch.int8), stable=True)
        self.sd_rows, self.teacher_rows = sd_rows[sd_order], sd_order
        g_rows = (~route).nonzero().squeeze(1)
        self.g_rows = g_rows[torch.argsort((~valid[g_rows]).to(torch.int8), stable=True)]
        self._workspace = None

    def _buffer(self, rows: int) -> torch.Tensor:
        """``[rows, V]`` logits buffer: a view of one workspace that both streams share, sized once for the larger.

        One allocation per run, not one per stream: buffers this large come fresh from the OS on every allocation,
        and each first touch of a page is a fault."""
        if self._workspace is None:
            need = max(2 * min(self.chunk, self.sd_rows.numel()), min(self.chunk, self.g_rows.numel()))
            self._workspace = self.hidden.new_empty(need, self.vocab)
        return self._workspace[:rows]

    # ---------------------------------------------------------------- GEMM helpers
    def _logits(self, rows_hidden, out):
        """out <- (h W^T + b) / T for one chunk, in place."""
        if self.bias is None:
            torch.mm(rows_hidden, self.weight.T, out=out)
            if self.inv_t != 1.0:
                out.mul_(self.inv_t)
        else:
            torch.addmm(self.bias, rows_hidden, self.weight.T, beta=self.inv_t, alpha=self.inv_t, out=out)
        return out

    def _backprop(self, dz, rows, rows_hidden, grads: Grads):
        if grads.hidden is not None:
            grads.hidden.index_copy_(0, rows, dz @ self.weight)
        if grads.weight is not None:
            acc = grads.weight
            torch.addmm(acc, dz.T.to(acc.dtype), rows_hidden.to(acc.dtype), beta=grads.weight_scale, out=acc)
            grads.weight_scale = 1.0
        if grads.bias is not None:
            grads.bias.add_(dz.sum(0).to(grads.bias.dtype))

    def new_grads(self, need_hidden, need_weight, need_bias) -> Grads:
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        return Grads(
            hidden=torch.zeros_like(self.hidden) if need_hidden else None,
            weight=torch.empty(self.weight.shape, dtype=acc, device=self.weight.device) if need_weight else None,
            bias=torch.zeros(self.vocab, dtype=acc, device=self.weight.device) if need_bias else None)

    def empty_stats(self) -> RowStats:
        z = self.hidden.new_zeros(self.hidden.shape[0])
        return RowStats(z.clone(), z.clone(), z.clone(), z.clone())

    # ---------------------------------------------------------------- streams
    def student_stream(self, stats: RowStats, coef: Optional[Callable], grads: Optional[Grads]):
        """The GRPO rows (student only, plain log-probs). `coef(rows, chunk_stats) -> (c_logp, c_ent)`."""
        rows = self.g_rows
        n_valid = int(self.x.valid[rows].sum())  # valid rows come first
        for start in range(0, rows.numel(), self.chunk):
            r = rows[start:start + self.chunk]
            h = self.hidden.index_select(0, r)
            z = self._logits(h, self._buffer(r.numel()))
            targets = self.x.token_ids.index_select(0, r)
            st = self.ops.student_stats(z, targets)
            stats.logp[r], stats.entropy[r] = st[:, S.LOGP], st[:, S.ENTROPY]
            if grads is None or start >= n_valid:  # only masked rows left: nothing to back-propagate
                continue
            c_logp, c_ent = coef(r, st)
            self.ops.student_grad(z, targets, st, c_logp, c_ent)
            self._backprop(z, r, h, grads)

    def distill_stream(self, stats: RowStats, coef: Optional[Callable], grads: Optional[Grads]):
        """SDPO rows: student and teacher logits of the same tokens. `coef(rows, chunk_stats) -> (c_logp, c_div)`."""
        rows, cfg = self.sd_rows, self.cfg
        teacher = self.x.teacher_hidden
        n_valid = int(self.x.valid[rows].sum())
        for start in range(0, rows.numel(), self.chunk):
            r = rows[start:start + self.chunk]
            c = r.numel()
            # Student and teacher rows in one GEMM: W is read once per chunk, and the GEMM is twice as tall.
            h = self.hidden.index_select(0, r)
            t = teacher.index_select(0, self.teacher_rows[start:start + self.chunk]).to(self.dtype)
            zu = self._logits(torch.cat([h, t]), self._buffer(2 * c))
            z, u = zu[:c], zu[c:]
            targets = self.x.token_ids.index_select(0, r)
            st, ids = self.ops.distill_stats(z, u, targets, cfg.alpha, cfg.topk, cfg.topk_tail)
            stats.logp[r], stats.entropy[r] = st[:, S.LOGP], st[:, S.ENTROPY]
            stats.teacher_entropy[r], stats.divergence[r] = st[:, S.T_ENTROPY], st[:, S.DIVERGENCE]
            if grads is None or start >= n_valid:
                continue
            c_logp, c_div = coef(r, st)
            self.ops.distill_grad(z, u, targets, st, ids, c_logp, c_div, cfg.alpha, cfg.topk, cfg.topk_tail)
            self._backprop(z, r, h, grads)


def weight_normalizer(x: FlatInputs, cfg: SRPOLossConfig, teacher_entropy: torch.Tensor) -> float:
    """The mean of exp(-beta H_T) over valid SDPO tokens, unless the caller supplied it (1.0 when there are none)."""
    if x.weight_normalizer is not None:
        return x.weight_normalizer
    if cfg.entropy_beta == 0:
        return 1.0
    sel = x.valid & x.route
    total = float(token_math.entropy_weight(teacher_entropy[sel], cfg).double().sum()) if bool(sel.any()) else 0.0
    count = float(sel.sum())
    if x.distributed:  # every rank reaches this exactly once per pass (see normalizer_known_upfront)
        device = x.hidden.device
        total, count = all_reduce_sums(total, count, device=device if device.type != "cpu" else None)
    return total / count if count else 1.0


def normalizer_known_upfront(x: FlatInputs, cfg: SRPOLossConfig) -> bool:
    if x.weight_normalizer is not None or cfg.entropy_beta == 0:
        return True
    # Data-parallel: a rank without SDPO tokens must still join the reduction, so it is never known upfront.
    return not x.distributed and not bool((x.valid & x.route).any())
