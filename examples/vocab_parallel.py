"""The SRPO loss with a vocabulary-parallel lm_head (tensor parallelism), on the CPU with gloo:

    torchrun --nproc-per-node 2 examples/vocab_parallel.py            # add --check to compare with one process

Each rank holds a contiguous block of the lm_head's rows (as Megatron's ColumnParallelLinear lm_head does) and the
same tokens. Every rank gets the full loss, the per-token outputs and the full dh; dW is its own block's. Prints
each rank's peak extra memory (RSS high-water during the call minus RSS before it), which scales with V / world.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import srpo_kernels as sk


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def block_sizes(vocab: int, world: int):
    """Contiguous blocks in rank order, as even as possible (they need not be equal)."""
    return [vocab // world + (r < vocab % world) for r in range(world)]


def lm_head_block(vocab: int, hidden: int, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of a random lm_head (each block from its own seed: no rank builds the whole head)."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(block_sizes(vocab, world)[rank], hidden, generator=g) / hidden ** 0.5


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens (every rank holds all of them)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen3's by default)")
    p.add_argument("--topk", type=int, default=None, help="distil over the global top-K support")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: from the largest block)")
    p.add_argument("--check", action="store_true", help="rank 0 also runs the unsharded call and compares")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    g = torch.Generator().manual_seed(0)  # the same tokens on every rank
    hidden = torch.randn(args.tokens, args.hidden, generator=g, requires_grad=True)
    token_ids = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    advantages = torch.randn(args.tokens, generator=g)
    route = torch.rand(args.tokens, generator=g) < 0.5
    teacher_hidden = torch.randn(int(route.sum()), args.hidden, generator=g)
    weight = lm_head_block(args.vocab, args.hidden, world, rank).requires_grad_()

    with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark
        f.write("5")
    before = _rss_bytes("VmRSS")
    out = sk.fused_srpo_loss(hidden, weight, token_ids, advantages, route, teacher_hidden, topk=args.topk,
                             chunk_size=args.chunk_size, vocab_parallel_group=dist.group.WORLD)
    out.loss.backward()
    peak = _rss_bytes("VmHWM") - before
    print(f"rank {rank}/{world}: vocabulary rows {weight.shape[0]}, loss {out.loss.item():.6f}, "
          f"peak extra memory {peak / 2**20:.0f} MiB", flush=True)

    dist.destroy_process_group()
    if args.check and rank == 0:  # after the group is gone: a one-process call must not join collectives
        full = torch.cat([lm_head_block(args.vocab, args.hidden, world, r) for r in range(world)]).requires_grad_()
        h1 = hidden.detach().clone().requires_grad_()
        ref = sk.fused_srpo_loss(h1, full, token_ids, advantages, route, teacher_hidden, topk=args.topk)
        ref.loss.backward()
        rows = weight.shape[0]
        print(f"unsharded: loss {ref.loss.item():.6f}; max |difference|: logprobs "
              f"{(out.logprobs - ref.logprobs).abs().max():.2e}, dh {(hidden.grad - h1.grad).abs().max():.2e}, "
              f"dW block {(weight.grad - full.grad[:rows]).abs().max():.2e}")


if __name__ == "__main__":
    main()
