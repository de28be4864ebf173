"""Vocabulary-parallel row passes: under tensor parallelism each rank holds a contiguous block of the lm_head's
rows, and every row statistic is combined across ranks with a few small collectives per chunk, never an [N, V]
gather.

Every rank runs the same chunk loop over the same tokens on its own ``[C, V_rank]`` block of logits. Per chunk:

- GRPO rows: an all_gather of the block maxima (``[C]``: the global max and which rank holds it) and an all_reduce
  of ``[C, 3]`` sums (shifted exps, their first moment, the target logit); the gradient adds one ``[C]`` all_reduce
  (the rebalance of sharp rows, see support.rebalance_).
- SDPO rows, full vocabulary: ``[C, 2]`` maxima, ``[C, 5]`` sums, ``[C, 2]`` divergence sums.
- SDPO rows, top-K: each rank's own top-K candidates (value, teacher value, global id) are gathered and the global
  top-K taken from their union under the same tie rule as everywhere (lowest global id); the tail follows from
  ``[C, 4]`` maxima and ``[C, 7]`` sums. The support math on ``[C, K+1]`` then runs identically on every rank.

The shifted sums mirror torch_chunked.TorchPasses.lse_entropy (the max's own term kept out of the sum, log1p), so a
sharded call rounds like the unsharded one. ``dh`` is all-reduced once per pass (ChunkRunner.finish_grads).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from . import row_ops as S
from .support import (GAP, GAP_LO, LS_U, LS_Z, M_U, M_Z, N_TENSOR_DISTILL_STATS, SHARP_LOG_PROB, STUDENT_M,
                      TAIL_Z, bucket_logprobs, divergence_grad, effective_topk, fill_support_stats, log_s_entropy,
                      lse_gap_pair, norm_of, shifted_logp, topk_ids)
from .torch_chunked import TORCH_TEMPORARIES, TorchPasses


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of the vocabulary: global ids ``[offset, offset + size)`` of ``vocab``."""

    group: object
    rank: int
    world: int
    offset: int
    size: int
    vocab: int
    max_size: int  # the largest block: every rank sizes its chunks by it, so all run the same number of chunks
    device: torch.device  # where the collectives' tensors live (hidden's device)

    @classmethod
    def create(cls, group, weight: torch.Tensor, hidden: torch.Tensor, token_ids: torch.Tensor,
               options) -> "VocabShard":
        """Gathers the block sizes (one collective) and checks that every rank passes the same tokens (shape, and a
        checksum of the ids) and the same `options` (the loss options and chunk size: ranks that differ in them run
        different chunks or collectives, and wait for each other forever). A block may be empty (0 rows) while the
        vocabulary is not."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("vocab_parallel_group needs torch.distributed to be initialised "
                             "(torch.distributed.init_process_group)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("vocab_parallel_group: this process is not a member of the group")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
            raise ValueError("hidden must have shape [..., H]")
        world = dist.get_world_size(group)
        n = hidden.numel() // max(hidden.shape[-1], 1)
        # A weight that is not a matrix is this rank's alone: sent as -1 rows, so that every rank raises (one rank
        # raising alone leaves the others waiting in this collective).
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else -1
        options_hash = zlib.crc32(repr(options).encode())
        needs_dh = torch.is_grad_enabled() and hidden.requires_grad  # dh is all-reduced: every rank or none
        mine = torch.tensor([rows, n, hidden.shape[-1], 0, options_hash, needs_dh], dtype=torch.int64,
                            device=hidden.device)
        mine[3] = fingerprint(token_ids, hidden.device)  # on the device: no sync of its own
        blocks = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(blocks, mine, group=group)
        sizes = [int(b[0]) for b in blocks]
        if min(sizes) < 0:
            raise ValueError(f"weight must be each rank's [V_rank, H] block of the lm_head under vocab_parallel_group;"
                             f" rank(s) {[r for r, s in enumerate(sizes) if s < 0]} passed something else")
        if any((int(b[1]), int(b[2])) != (n, hidden.shape[-1]) for b in blocks):
            shapes = [(int(b[1]), int(b[2])) for b in blocks]
            raise ValueError("vocab_parallel_group: every rank must pass the same tokens (hidden [N, H] alike); "
                             f"got (N, H) by rank: {shapes}")
        if len({int(b[3]) for b in blocks}) > 1:
            # e.g. a data-parallel shard on each rank of the tensor-parallel group: a loss of nothing, silently
            raise ValueError("vocab_parallel_group: every rank must pass the same tokens; token_ids differ between "
                             "ranks (each rank gets its own block of the lm_head, not its own data)")
        if len({int(b[4]) for b in blocks}) > 1:
            raise ValueError(f"vocab_parallel_group: every rank must pass the same options (loss options, temperature,"
                             f" chunk_size); they differ between ranks (this rank's: {options})")
        if len({int(b[5]) for b in blocks}) > 1:
            raise ValueError(f"vocab_parallel_group: hidden requires grad (under grad mode) on rank(s) "
                             f"{[r for r, b in enumerate(blocks) if b[5]]} and not on the others: the ranks sum dh "
                             f"together, so every rank or none must ask for it")
        return cls(group, rank, world, sum(sizes[:rank]), sizes[rank], sum(sizes), max(sizes), hidden.device)

    def agree(self, refused: Optional[Exception], same: Optional[dict] = None) -> None:
        """Raises on every rank if any rank refused its arguments (`refused`: this rank's error, or None): checks of
        a rank's own block (its weight's dtype, its bias's shape) pass or fail per rank, and a rank raising alone
        left the others waiting in the next collective. `same`: name -> what every rank must pass alike (a tensor,
        number or None; the same names on every rank, values ignored where `refused`), compared by `fingerprint` in
        the same collective: a route or loss_mask that differs between ranks makes them run different collectives (a
        hang), other per-token inputs a loss of mixed data. One small collective."""
        names = list(same or {})
        mine = [torch.tensor(int(refused is not None), device=self.device)]
        mine += [fingerprint(same[k], self.device) if refused is None else mine[0] for k in names]
        by_rank = self.gather(torch.stack([t.to(torch.int64) for t in mine]))
        if refused is not None:
            raise refused
        refusals = by_rank[:, 0]
        if bool(refusals.any()):
            ranks = [r for r in range(self.world) if refusals[r]]
            raise ValueError(f"vocab_parallel_group: rank(s) {ranks} refused their arguments (their error says why); "
                             f"every rank raises, so that none waits for the others in a collective")
        differ = [k for i, k in enumerate(names) if bool((by_rank[:, i + 1] != by_rank[0, i + 1]).any())]
        if differ:
            raise ValueError(f"vocab_parallel_group: every rank must pass the same {', '.join(differ)}, as it "
                             f"passes the same token_ids (the ranks split the vocabulary, not the tokens); "
                             f"{'it differs' if len(differ) == 1 else 'they differ'} between ranks")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world, *t.shape]``: every rank's `t`."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(t, group=self.group)
        return t


def _block_max(x):
    """Each row's (max, first argmax ``[C, 1]``) within this block; -inf for a block without columns."""
    if x.shape[1] == 0:
        return x.new_full((x.shape[0],), -math.inf), torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    top = x.argmax(1, keepdim=True)
    return x.gather(1, top).squeeze(1), top


def _safe(m):
    """A shift for exp(x - m): 0 where the row has no finite entry (then every exp is 0, not NaN)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _moments(x, m, mine, top):
    """Sums over this block of e = exp(x - m) and e (x - m), the max's own term (exactly 1) left out on the rank
    that holds it (``mine``): s = 1 + r, and log1p(r) keeps r where fp32 cannot hold 1 + r."""
    if x.shape[1] == 0:
        zero = x.new_zeros(x.shape[0])
        return zero, zero
    y = x - _safe(m)[:, None]
    e = y.exp()
    e.scatter_(1, top, torch.where(mine[:, None], torch.zeros_like(m)[:, None], e.gather(1, top)))
    return e.sum(1), torch.where(e > 0, e * y, torch.zeros_like(e)).sum(1)


class VocabParallelRowOps:
    """The RowOps of one rank's vocabulary block (tensor ops on any device; collectives over ``shard.group``)."""

    name = "vocab-parallel"
    temporaries = TORCH_TEMPORARIES  # the torch backend's tensor-op passes, and their temporaries
    linear_student_stats = None
    fuses_casts = False

    def __init__(self, shard: VocabShard):
        self.vocab_shard = shard
        # Per-entry passes given the global (max, log s) of a row: the torch backend's, unchanged on a block.
        self.passes = TorchPasses()

    # ------------------------------------------------------------------ helpers
    def _maxima(self, local):
        """Global (max, held-here flag, local argmax) of rows from each block's local ``_block_max``: one
        all_gather for all of them."""
        everyone = self.vocab_shard.gather(torch.stack([m for m, _ in local], 1))  # [world, C, k]
        m = everyone.max(0).values
        owner = (everyone == m).to(torch.int8).argmax(0)  # the lowest rank holding it: lowest global id wins
        mine = owner == self.vocab_shard.rank
        return [(m[:, i], mine[:, i], top) for i, (_, top) in enumerate(local)]

    def _target_shifted(self, z, targets, m):
        """z_y - m on the rank that holds y, 0 elsewhere (summed over ranks: z_y - m exactly)."""
        if z.shape[1] == 0:
            return z.new_zeros(z.shape[0])
        idx, here = self._owned(targets)
        return torch.where(here, z.gather(1, idx[:, None]).squeeze(1) - m, torch.zeros_like(m))

    def _add_target_(self, grad, targets, c_logp):
        if grad.shape[1]:
            idx, here = self._owned(targets)
            grad.scatter_add_(1, idx[:, None], torch.where(here, c_logp, torch.zeros_like(c_logp))[:, None])

    def _rebalance_(self, grad, top, mine, log_s):
        """support.rebalance_ across ranks: the rank holding the argmax sets it to minus the sum of every other
        entry of the row, on every rank, on rows where it holds more than half the probability."""
        sharp = -log_s > SHARP_LOG_PROB  # log p_max = -log s
        if grad.shape[1] == 0:
            self.vocab_shard.sum_(grad.new_zeros(grad.shape[0]))
            return
        own = grad.gather(1, top)
        grad.scatter_(1, top, torch.where(mine[:, None], torch.zeros_like(own), own))
        others = self.vocab_shard.sum_(grad.sum(1))
        grad.scatter_(1, top, torch.where((mine & sharp)[:, None], -others[:, None], own))

    def _owned(self, ids):
        """(local column, held here) of global ids (any shape; the column is clamped into the block elsewhere)."""
        local = ids - self.vocab_shard.offset
        here = (local >= 0) & (local < self.vocab_shard.size)
        return local.clamp(0, max(self.vocab_shard.size - 1, 0)), here

    # ------------------------------------------------------------------ the RowOps contract
    def student_stats(self, z, targets):
        ((m, mine, top),) = self._maxima([_block_max(z)])
        r, t = _moments(z, m, mine, top)
        sums = self.vocab_shard.sum_(torch.stack([r, t, self._target_shifted(z, targets, m)], 1))
        log_s, entropy = log_s_entropy(sums[:, 0], sums[:, 1])
        # private columns: (max, log s) at STUDENT_M, then whether this rank holds the argmax (_MINE_STUDENT)
        return torch.stack([m + log_s, sums[:, 2] - log_s, entropy, m.to(log_s.dtype), log_s,
                            mine.to(log_s.dtype)], 1).to(z.dtype)

    def student_grad(self, z, targets, stats, c_logp, c_ent):
        _, top = _block_max(z)
        norm = norm_of(stats, STUDENT_M)
        self.passes.fill_student_grad(z, norm, stats[:, S.ENTROPY], c_logp, c_ent)
        self._add_target_(z, targets, c_logp)
        self._rebalance_(z, top, stats[:, _MINE_STUDENT] > 0, norm[1])

    def distill_stats(self, z, u, targets, alpha, topk, topk_tail):
        k = effective_topk(topk, self.vocab_shard.vocab)
        stats = z.new_zeros(z.shape[0], _MINE_Z + 1 + (0 if k is None else 2 * k))
        if k is None:
            (m_z, mine, top_z), (m_u, mine_u, top_u) = self._maxima([_block_max(z), _block_max(u)])
            r_z, t_z = _moments(z, m_z, mine, top_z)
            r_u, t_u = _moments(u, m_u, mine_u, top_u)
            sums = self.vocab_shard.sum_(torch.stack([r_z, t_z, r_u, t_u, self._target_shifted(z, targets, m_z)], 1))
            norms, ent_u = self._fill_norms(stats, sums, m_z, m_u, mine)
            S.set_teacher_entropy(stats, ent_u)
            stats[:, GAP], stats[:, GAP_LO] = lse_gap_pair(*norms, stats.dtype)
            # This block's share; shift 0: the row's argmax lives on one rank (twins tied at the top of a row with a
            # large divergence keep the unshifted terms' rounding here).
            d_aux = self.passes.full_divergence(z, u, norm_of(stats, M_Z), norm_of(stats, M_U), norm_of(stats, GAP),
                                                alpha, torch.zeros_like(stats[:, 0]))
            stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = self.vocab_shard.sum_(torch.stack(d_aux, 1)).unbind(1)
            return stats, None
        ids, zk, uk = self._global_topk(z, u, k)
        stats[:, _SUPPORT:_SUPPORT + k], stats[:, _SUPPORT + k:] = zk, uk
        full = [_block_max(z), _block_max(u)]
        # The tails: this rank's support entries masked out while their sums are taken, then put back.
        local, here = self._owned(ids)
        rows, cols = here.nonzero(as_tuple=True)
        cols = local[rows, cols]
        saved_z, saved_u = z[rows, cols], u[rows, cols]
        z[rows, cols], u[rows, cols] = -math.inf, -math.inf
        (m_z, mine, top_z), (m_u, mine_u, top_u), (m_tz, mine_tz, top_tz), (m_tu, mine_tu, top_tu) = self._maxima(
            full + [_block_max(z), _block_max(u)])
        r_tz, _ = _moments(z, m_tz, mine_tz, top_tz)
        r_tu, _ = _moments(u, m_tu, mine_tu, top_tu)
        z[rows, cols], u[rows, cols] = saved_z, saved_u
        r_z, t_z = _moments(z, m_z, mine, top_z)
        r_u, t_u = _moments(u, m_u, mine_u, top_u)
        sums = self.vocab_shard.sum_(torch.stack([r_z, t_z, r_u, t_u, self._target_shifted(z, targets, m_z),
                                                  r_tz, r_tu], 1))
        norms = self._fill_norms(stats, sums, m_z, m_u, mine)[0]
        tails = [(m_tz, torch.log1p(sums[:, 5].double())), (m_tu, torch.log1p(sums[:, 6].double()))] if topk_tail \
            else None
        fill_support_stats(stats, zk, uk, alpha, norms, tails)
        return stats, ids

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha, topk, topk_tail):
        _, top = _block_max(z)
        lse_z = stats[:, S.LSE]
        norm_z = norm_of(stats, M_Z)
        mine = stats[:, _MINE_Z] > 0
        if topk_ids is None:
            self.passes.fill_distill_grad(z, u, norm_z, norm_of(stats, M_U), norm_of(stats, GAP), stats[:, S.AUX_KL],
                                          c_logp, c_div, alpha, torch.zeros_like(lse_z))
        else:
            k = topk_ids.shape[1]
            zk, uk = stats[:, _SUPPORT:_SUPPORT + k], stats[:, _SUPPORT + k:]
            lp, lq, delta = bucket_logprobs(zk, uk, stats, topk_tail)
            g = c_div[:, None] * divergence_grad(lp, lq, delta, stats[:, S.AUX_KL], alpha)
            # Every entry as a tail member (spread by p_j / p_tail, none without a tail), then the support's own.
            g_tail = g[:, -1] if topk_tail else torch.zeros_like(lse_z)
            tail_shift = norm_z[1] + stats[:, TAIL_Z] if topk_tail else norm_z[1]
            self.passes.fill_tail_grad(z, norm_z, g_tail, (norm_z[0], tail_shift), c_logp)
            local, here = self._owned(topk_ids)
            rows, cols = here.nonzero(as_tuple=True)
            support = g[:, :k] - c_logp[:, None] * torch.exp(shifted_logp(zk, norm_z))
            z[rows, local[rows, cols]] = support[rows, cols]
        self._add_target_(z, targets, c_logp)
        self._rebalance_(z, top, mine, norm_z[1])

    # ------------------------------------------------------------------ distill helpers
    def _fill_norms(self, stats, sums, m_z, m_u, mine):
        """The student's and teacher's stats columns from the reduced sums; returns both sides' (max, log s) with
        log s in fp64, and the full row's teacher entropy in fp64."""
        ls_z, ent_z = log_s_entropy(sums[:, 0], sums[:, 1])
        ls_u, ent_u = log_s_entropy(sums[:, 2], sums[:, 3])
        stats[:, S.LSE], stats[:, S.LOGP], stats[:, S.ENTROPY] = m_z + ls_z, sums[:, 4] - ls_z, ent_z
        stats[:, S.T_LSE] = m_u + ls_u
        stats[:, M_Z], stats[:, LS_Z], stats[:, M_U], stats[:, LS_U] = m_z, ls_z, m_u, ls_u
        stats[:, _MINE_Z] = mine.to(stats.dtype)
        return ((m_z, ls_z), (m_u, ls_u)), ent_u

    def _global_topk(self, z, u, k):
        """The global top-K of each row of z (lowest global id among ties): ids ``[C, K]`` and both sides' values.

        Each rank offers its own top-min(K, V_rank) (the global top-K of a row is among the union, by the same
        order), padded with -inf at ids past the vocabulary so that real entries win every tie."""
        c, shard = z.shape[0], self.vocab_shard
        own = min(k, z.shape[1])
        offer = torch.empty(c, k, 3, dtype=torch.float64, device=z.device)
        offer[:, :, 0], offer[:, :, 1] = -math.inf, 0.0
        offer[:, :, 2] = shard.vocab + torch.arange(k, device=z.device, dtype=torch.float64)
        if own:
            local = topk_ids(z, own)
            offer[:, :own, 0], offer[:, :own, 1] = z.gather(1, local).double(), u.gather(1, local).double()
            offer[:, :own, 2] = (local + shard.offset).double()
        pool = shard.gather(offer).permute(1, 0, 2, 3).reshape(c, shard.world * k, 3)
        pool = pool.gather(1, pool[:, :, 2].argsort(1)[:, :, None].expand(-1, -1, 3))  # by id: lowest column wins
        pick = topk_ids(pool[:, :, 0], k)
        chosen = pool.gather(1, pick[:, :, None].expand(-1, -1, 3))
        return chosen[:, :, 2].long(), chosen[:, :, 0].to(z.dtype), chosen[:, :, 1].to(z.dtype)


# Private columns beyond TensorRowOps' layout: whether this rank holds the student's argmax (after the student
# stats' (max, log s); in the distill stats after theirs), then for top-K the support's student and teacher logits
# (K each), which distill_grad needs and only the gathered pool holds.
_MINE_STUDENT = STUDENT_M + 2
_MINE_Z = N_TENSOR_DISTILL_STATS  # SHIFT itself unused here: the blocks take shift 0 (see distill_stats)
_SUPPORT = _MINE_Z + 1


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(value, device) -> torch.Tensor:
    """An int64 position-weighted sum (wrapping) of a tensor's values (integers, bools) or bits (floats: -0.0 and
    0.0 differ, NaN equals itself), or of a number's bits; -1 for None. Equal on ranks that pass the same thing;
    computed on `device` with no sync of its own. 0 for what is not a real tensor on `device` (the argument checks
    refuse it)."""
    if value is None:
        return torch.tensor(-1, dtype=torch.int64, device=device)
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float64, device=device).view(torch.int64)
    if value.is_complex() or value.device != device:
        return torch.zeros((), dtype=torch.int64, device=device)
    flat = value.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.contiguous().view(_BITS[flat.element_size()])
    weights = torch.arange(1, flat.numel() + 1, device=device, dtype=torch.int64) * 2654435761
    return (flat.long() * weights).sum()


def vocab_parallel_ops(group, weight: torch.Tensor, hidden: torch.Tensor, token_ids: torch.Tensor,
                       backend: str, options) -> Optional[VocabParallelRowOps]:
    """The row passes for `group` (None: not vocabulary-parallel). `options`: what every rank must pass alike
    besides the tensors (compared by its repr)."""
    if group is None:
        return None
    if backend not in ("auto", "torch"):
        raise ValueError(f"vocab_parallel_group runs the tensor-op row passes; backend must be 'auto' or 'torch', "
                         f"got {backend!r}")
    return VocabParallelRowOps(VocabShard.create(group, weight, hidden, token_ids, options))
