"""The chunk loop: GEMMs around a backend's row passes, never holding more than ``[C, V]`` logits.

Rows are processed in two streams: the SDPO-routed rows (student and teacher logits side by side), then the GRPO
rows. SDPO goes first so that the entropy-weight normaliser ``mean(exp(-beta H_T))``, known only once every teacher
row has been seen, is final before any GRPO row adds to the same ``dW`` (the SDPO rows follow a running normaliser
meanwhile, see function._RunningNormalizer). Within a stream, valid rows come first, so chunks of masked rows skip
the gradient GEMMs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import token_math, workspace
from .backends import row_ops as S
from .backends.row_ops import RowOps, Widen
from .config import SRPOLossConfig
from .distributed import all_reduce_min, all_reduce_sums
from .gemm import Gemms
from .inputs import FlatInputs

# Cap on one fp32 [C, V] logits buffer (the SDPO stream's stacked buffer is twice this). A GPU gets more: its
# per-chunk launch overhead is fixed while a chunk's passes take microseconds, and it has the memory.
CHUNK_BYTES = 128 << 20
CHUNK_BYTES_CUDA = 512 << 20


def default_chunk_size(vocab: int, hidden: int, device: Optional[torch.device] = None, temporaries: int = 0,
                       scratch_bytes: int = 0) -> int:
    """Rows per chunk: about H (at least 256), within CHUNK_BYTES (CHUNK_BYTES_CUDA on a GPU) shared by the logits
    (4 bytes an entry, plus on the CPU `scratch_bytes` for the bf16/fp16 copy that low-precision GEMMs read and
    write) and the backend's `temporaries`, in [16, 4096] and a multiple of 16. Counting the scratch cost no time
    at the SmolLM2-like shape in bf16 (1.55x vs 1.57x the GEMM floor at C = 448 vs 576, all SDPO) and took the bf16
    peak at N = 2048, H = 256, V = 151 936 (half SDPO) from 572 to 460 MB. With fused casts (the C++ backend) the
    student's rows have no fp32 copy, so this overcounts them; the peak there is 344 MB, 422 MB with the buffers
    kept between calls (workspace.py; fp32 inputs: 434 MB).

    Each chunk streams W (V x H) through three GEMMs, and its logits (C x V) through the GEMMs and the row passes;
    C ~ H keeps W's share of that traffic below the logits'. Smaller chunks re-read W (and pay the per-chunk
    overhead more often); larger ones fall out of cache and cost memory. Measured on 2 Sapphire Rapids cores
    (``python -m benchmarks.floor_ratio --chunk-sizes ...``): best near C = 256 for H = 256, C >= 336 for H = 576;
    for H = 1024, V = 151 936 (all SDPO) 1.46x the GEMM floor at C = 96, 1.16x at 208 (this cap), 1.10x at 256,
    where the workspace would push the peak memory past a tenth of the materialising reference's.
    """
    cuda = device is not None and device.type == "cuda"
    budget = CHUNK_BYTES_CUDA if cuda else CHUNK_BYTES
    # The CUDA budget's figures (benchmarks/gpu, H100) were measured with the scratch outside it: kept as measured.
    per_entry = 4 + (0 if cuda else scratch_bytes)
    rows = min(max(hidden, 256), budget // (per_entry * vocab * (1 + temporaries)))
    return max(16, min(4096, rows // 16 * 16))


@dataclass
class RowStats:
    """Per-token results of the vocabulary passes (fp32/fp64, length N; zeros where a branch does not apply)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    teacher_entropy: torch.Tensor  # fp64, with its low part (row_ops.teacher_entropy): it sets the weights
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
    """Runs the chunk loop over flat inputs with one backend; GEMMs follow the policy of ``gemm.py``."""

    def __init__(self, hidden, weight, bias, x: FlatInputs, cfg: SRPOLossConfig, ops: RowOps,
                 chunk_size: Optional[int]):
        self.x, self.cfg, self.ops = x, cfg, ops
        self.gemms = Gemms(weight, bias, cfg.temperature, rows=(hidden, x.teacher_hidden), absmax=x.absmax)
        self.dtype = self.gemms.math
        self.hidden = hidden.detach()  # GEMM operand: stays in the input dtype
        self.weight_shape = weight.shape
        self.vocab = weight.shape[0]
        # Vocabulary-parallel ranks size chunks by the largest block: the per-chunk collectives must pair up.
        sizing = self.vocab if ops.vocab_shard is None else ops.vocab_shard.max_size
        scratch_bytes = torch.finfo(self.gemms.operand).bits // 8 if self.gemms.low else 0
        self.chunk = chunk_size or default_chunk_size(sizing, weight.shape[1], weight.device, ops.temporaries,
                                                      scratch_bytes)
        route, valid = x.route, x.valid
        # Valid rows first inside each stream (stable, so teacher rows stay aligned with their tokens).
        sd_rows = route.nonzero().squeeze(1)
        sd_order = torch.argsort((~valid[sd_rows]).to(torch.int8), stable=True)
        self.sd_rows, self.teacher_rows = sd_rows[sd_order], sd_order
        g_rows = (~route).nonzero().squeeze(1)
        self.g_rows = g_rows[torch.argsort((~valid[g_rows]).to(torch.int8), stable=True)]
        self._workspace = self._scratch = None
        self._taken = []  # the pool's flat buffers behind them
        # bf16 on the CPU: the backend widens the GEMM's output and narrows dL/dz row by row (row_ops.Widen). Not fp16:
        # its dL/dz takes a scale from the whole chunk before it is narrowed (gemm.Gemms.fp16_grad_scale).
        self.fused_casts = (self.gemms.low and not self.gemms.fp32_out and ops.fuses_casts
                            and self.gemms.operand != torch.float16)

    def _buffers(self, low_rows: int, fp32_rows: int):
        """``[fp32_rows, V]`` logits (math dtype) and, for bf16/fp16 operands, a ``[low_rows, V]`` scratch in the
        input dtype: views of one workspace each, taken from the pool of ``workspace.py`` (buffers this large come
        fresh from the OS on every allocation, and each first touch of a page is a fault), sized for the larger
        stream so that both streams and the next call reuse the same ones. A stream gives them back as it ends."""
        if self._workspace is None:
            sd, g = min(self.chunk, self.sd_rows.numel()), min(self.chunk, self.g_rows.numel())
            need = max(2 * sd, g)
            # Fused casts keep the student's rows in the input dtype: only the teacher's need fp32 rows.
            self._workspace = self._take(sd if self.fused_casts else need, self.dtype)
            if self.gemms.low:
                self._scratch = self._take(need, self.gemms.operand)
        return self._workspace[:fp32_rows], None if self._scratch is None else self._scratch[:low_rows]

    def _take(self, rows: int, dtype) -> torch.Tensor:
        flat = workspace.take(rows * self.vocab, dtype, self.hidden.device)
        self._taken.append(flat)
        return flat[:rows * self.vocab].view(rows, self.vocab)

    def _give_back_buffers(self) -> None:
        self._workspace = self._scratch = None
        while self._taken:
            workspace.give_back(self._taken.pop())

    def _logits(self, h, teacher_rows: int = 0):
        """A chunk's logits as the backend takes them: (z, u, casts, scratch), `casts` the keyword arguments of
        every pass. With `teacher_rows`, the last rows of `h` are the teacher's (u), else u is None. Without fused
        casts z and u are fp32 (the GEMM and the widening done here) and `casts` is empty: such a backend never
        sees a ``widen``. With them z is None, ``casts["widen"]`` holds the GEMM's bf16 output (in `scratch`)
        and u the fp32 rows the backend widens the teacher's into."""
        c = h.shape[0] - teacher_rows
        if not self.fused_casts:
            buf, scratch = self._buffers(h.shape[0], h.shape[0])
            zu = self.gemms.logits(h, buf, scratch)
            return zu[:c], (zu[c:] if teacher_rows else None), {}, scratch
        buf, scratch = self._buffers(h.shape[0], teacher_rows)
        low = self.gemms.low_logits(h, scratch)
        widen = Widen(low[:c], low[c:] if teacher_rows else None, self.gemms.bias, self.gemms.temperature)
        return None, (buf if teacher_rows else None), {"widen": widen}, scratch

    def _backprop(self, dz, scratch, rows, rows_hidden, grads: Grads):
        """The backward GEMMs of a chunk from dL/dz: `dz` (fp32; None where the backend has written it into
        `scratch` in the input dtype already, fused casts)."""
        # unscale: what the GEMMs' results take to undo the power of two an fp16 dL/dz is scaled by (gemm.py)
        dz_op, unscale = (scratch, 1.0) if dz is None else self.gemms.narrow(dz, scratch, rows_hidden)
        if grads.hidden is not None:
            dh = self.gemms.grad_hidden(dz_op).to(grads.hidden.dtype)
            grads.hidden.index_copy_(0, rows, dh if unscale == 1.0 else dh.mul_(unscale))
        if grads.weight is not None:
            self.gemms.add_grad_weight(grads.weight, dz_op, rows_hidden, grads.weight_scale, unscale)
            grads.weight_scale = 1.0
        if grads.bias is not None:  # from the GEMMs' operand, as autograd sums the naive loss's dL/dz
            grads.bias.add_(dz_op.sum(0, dtype=grads.bias.dtype), alpha=unscale)

    def new_grads(self, need_hidden, need_weight, need_bias) -> Grads:
        acc, device = self.dtype, self.hidden.device
        return Grads(
            hidden=torch.zeros(self.hidden.shape, dtype=acc, device=device) if need_hidden else None,
            weight=torch.empty(self.weight_shape, dtype=acc, device=device) if need_weight else None,
            bias=torch.zeros(self.vocab, dtype=acc, device=device) if need_bias else None)

    def finish_grads(self, grads: Grads) -> None:
        """Apply the pending weight scale; under a vocabulary-parallel lm_head, sum each rank's share of dh."""
        grads.finalize_()
        if grads.hidden is not None and self.ops.vocab_shard is not None:
            self.ops.vocab_shard.sum_(grads.hidden)

    def empty_stats(self) -> RowStats:
        z = torch.zeros(self.hidden.shape[0], dtype=self.dtype, device=self.hidden.device)
        return RowStats(z.clone(), z.clone(), z.double(), z.clone())

    # ---------------------------------------------------------------- streams
    def student_stream(self, stats: RowStats, coef: Optional[Callable], grads: Optional[Grads]):
        """The GRPO rows (student only, plain log-probs). `coef(rows, chunk_stats) -> (c_logp, c_ent)`."""
        rows = self.g_rows
        if grads is None and self.ops.linear_student_stats is not None and rows.numel():
            h = self.gemms.operand_rows(self.hidden.index_select(0, rows))
            _, logp, entropy = self.ops.linear_student_stats(h, self.gemms.weight, self.gemms.bias,
                                                             self.x.token_ids.index_select(0, rows),
                                                             self.gemms.inv_t)
            stats.logp[rows], stats.entropy[rows] = logp, entropy
            return
        n_valid = int(self.x.valid[rows].sum())  # valid rows come first
        try:
            for start in range(0, rows.numel(), self.chunk):
                r = rows[start:start + self.chunk]
                h = self.gemms.operand_rows(self.hidden.index_select(0, r))
                z, _, casts, scratch = self._logits(h)
                targets = self.x.token_ids.index_select(0, r)
                st = self.ops.student_stats(z, targets, **casts)
                stats.logp[r], stats.entropy[r] = st[:, S.LOGP], st[:, S.ENTROPY]
                if grads is None or start >= n_valid:  # only masked rows left: nothing to back-propagate
                    continue
                c_logp, c_ent = coef(r, st)
                self.ops.student_grad(z, targets, st, c_logp, c_ent, **casts)
                self._backprop(z, scratch, r, h, grads)
        finally:
            self._give_back_buffers()

    def distill_stream(self, stats: RowStats, coef: Optional[Callable], grads: Optional[Grads]):
        """SDPO rows: student and teacher logits of the same tokens. `coef(rows, chunk_stats) -> (c_logp, c_div)`."""
        rows, cfg = self.sd_rows, self.cfg
        teacher = self.x.teacher_hidden
        n_valid = int(self.x.valid[rows].sum())
        try:
            for start in range(0, rows.numel(), self.chunk):
                r = rows[start:start + self.chunk]
                c = r.numel()
                # Student and teacher rows in one GEMM: W is read once per chunk, and the GEMM is twice as tall.
                h = self.gemms.operand_rows(self.hidden.index_select(0, r))
                t = self.gemms.operand_rows(teacher.index_select(0, self.teacher_rows[start:start + self.chunk]))
                z, u, casts, scratch = self._logits(torch.cat([h, t]), teacher_rows=c)
                targets = self.x.token_ids.index_select(0, r)
                st, ids = self.ops.distill_stats(z, u, targets, cfg.alpha, cfg.topk, cfg.topk_tail, **casts)
                stats.logp[r], stats.entropy[r] = st[:, S.LOGP], st[:, S.ENTROPY]
                stats.teacher_entropy[r], stats.divergence[r] = S.teacher_entropy(st), st[:, S.DIVERGENCE]
                if grads is None or start >= n_valid:
                    continue
                c_logp, c_div = coef(r, st)
                self.ops.distill_grad(z, u, targets, st, ids, c_logp, c_div, cfg.alpha, cfg.topk, cfg.topk_tail,
                                      **casts)
                self._backprop(z, None if scratch is None else scratch[:c], r, h, grads)
        finally:
            self._give_back_buffers()


def log_weight_normalizer(x: FlatInputs, cfg: SRPOLossConfig, teacher_entropy: Optional[torch.Tensor]) -> float:
    """log of the mean of exp(-beta H_T) over valid SDPO tokens, unless the caller supplied the mean (0.0, i.e. a
    mean of 1, when there are none). Kept as a log: the mean itself underflows for large beta * H_T."""
    if x.weight_normalizer is not None:
        return math.log(x.weight_normalizer)
    if cfg.entropy_beta == 0:
        return 0.0
    sel = x.valid & x.route
    count = float(sel.sum())
    log_total = token_math.log_weight_sum(teacher_entropy[sel], cfg) if count else -math.inf
    if x.distributed:  # every rank reaches this exactly once per pass (see normalizer_known_upfront)
        device = x.token_ids.device
        device = device if device.type != "cpu" else None
        shift = -all_reduce_min(-log_total, device=device)  # the largest log-sum over ranks
        total, count = all_reduce_sums(math.exp(log_total - shift) if count else 0.0, count, device=device)
        log_total = shift + math.log(total) if total > 0 else -math.inf
    return log_total - math.log(count) if count else 0.0


def normalizer_known_upfront(x: FlatInputs, cfg: SRPOLossConfig) -> bool:
    if x.weight_normalizer is not None or cfg.entropy_beta == 0:
        return True
    # Data-parallel: a rank without SDPO tokens must still join the reduction, so it is never known upfront.
    return not x.distributed and not bool((x.valid & x.route).any())
