"""Vocabulary parallel (backends/vocab_parallel.py): 2 and 3 gloo processes, each holding a contiguous block of the
lm_head's rows, against the unsharded call in one process (fp32, to 1e-5): loss, per-token outputs, dh, and each
rank's block of dW/db, over every option."""
import contextlib
import math
import os
import random
import tempfile

import pytest
import torch
import torch.distributed as dist

import srpo_kernels as sk
from cases import FLOAT_ARGS, make_case, max_rel_err
from processes import spawn_within

N = 48
ROUTINGS = {"sdpo": 1.0, "grpo": 0.0, "mixed": 0.5, "tied": 1.0}
OPTIONS = [
    dict(),
    dict(alpha=0.0),
    dict(alpha=1.0, temperature=0.7),
    dict(topk=6),
    dict(topk=6, topk_tail=False, alpha=0.0),
    dict(topk=64, alpha=1.0),  # K above the smallest block: that rank offers all it has
    dict(reduction="sum", entropy_beta=2.0),
    dict(reduction="none", topk=5),
    dict(normalizer=17.0, weight_normalizer=0.4, ref_beta=0.1),
]
# (world, block sizes): uneven blocks, one of them empty (a rank holding no rows takes part in every collective);
# V = 5000 in halves is the acceptance case.
LAYOUTS = [(2, (2500, 2500)), (3, (50, 0, 161))]


def _case(routing, sizes):
    case = make_case(seed=len(sizes), n=N, v=sum(sizes), sd_frac=ROUTINGS[routing], ref=True)
    if routing == "tied":  # the next block starts with twins of the first's rows: top-K ties across ranks
        n = min(size for size in sizes if size)
        case["weight"][sizes[0]:sizes[0] + n] = case["weight"][:n]
        case["bias"][sizes[0]:sizes[0] + n] = case["bias"][:n]
    # A masked vocabulary entry in the last block, one no token was sampled from (its log-prob is -inf).
    masked = next(i for i in range(sum(sizes) - 1, 0, -1) if i not in case["token_ids"])
    case["bias"][masked] = -torch.inf
    return case


def _call(case, rows, options, group=None, dtype=torch.float32, chunk_size=16, fn=None):
    """The loss on the vocabulary `rows` of the lm_head, fused (or `fn`, e.g. the reference, unsharded); returns
    outputs and gradients in `dtype`."""
    hidden = case["hidden"].detach().to(dtype).requires_grad_()
    weight = case["weight"][rows].to(dtype).requires_grad_()
    bias = case["bias"][rows].to(dtype).requires_grad_()
    th = case["teacher_hidden"]
    floats = torch.float64 if dtype == torch.float64 else torch.float32
    given = {k: case[k].to(floats) for k in FLOAT_ARGS if case.get(k) is not None}
    fused = {} if fn is not None else dict(backend="torch", chunk_size=chunk_size, vocab_parallel_group=group)
    out = (fn or sk.fused_srpo_loss)(hidden, weight, case["token_ids"], case["advantages"].to(floats), case["route"],
                                     None if th is None else th.to(dtype), loss_mask=case["loss_mask"], bias=bias,
                                     **given, **options, **fused)
    loss = out.loss
    if options.get("reduction") == "none":
        loss = (loss * torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype)).sum()
    loss.backward()
    per_token = torch.stack([out.logprobs, out.entropy, out.teacher_entropy, out.divergence, out.distill_weight])
    return dict(loss=out.loss.detach(), per_token=per_token, dh=hidden.grad, dw=weight.grad, db=bias.grad)


def _logprobs(case, rows, group=None):
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"][rows].float().requires_grad_()
    logp, ent = sk.fused_logprobs(hidden, weight, case["token_ids"], temperature=0.9, with_entropy=True,
                                  backend="torch", chunk_size=16, vocab_parallel_group=group)
    (logp.sum() + (ent * torch.linspace(0, 1, N)).sum()).backward()
    return dict(per_token=torch.stack([logp, ent]).detach(), dh=hidden.grad, dw=weight.grad)


def _one_more_distilled(case, options):
    i = int((~case["route"]).nonzero()[0])
    case["route"][i] = True
    case["teacher_hidden"] = torch.cat([case["teacher_hidden"], case["hidden"][:1]])


# What the last rank alone changes, and the error every rank must raise: a route with one more distilled token ran
# other collectives on that rank (a hang); the others gave each rank a loss of other data, silently.
DISAGREEMENTS = {
    "route": (_one_more_distilled, "every rank must pass the same route"),
    "route_shape": (lambda case, options: case.update(route=case["route"][:5]), "refused their arguments"),
    "loss_mask": (lambda case, options: case["loss_mask"].logical_not_(), "every rank must pass the same loss_mask"),
    "advantages": (lambda case, options: case["advantages"].add_(1.0), "every rank must pass the same advantages"),
    "normalizer": (lambda case, options: options.update(normalizer=5.0), "every rank must pass the same normalizer"),
    "topk": (lambda case, options: options.update(topk=3), "every rank must pass the same options"),
    "chunk_size": (lambda case, options: options.update(chunk_size=9), "every rank must pass the same options"),
}


def _block(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank, world, sizes, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    rows = _block(sizes, rank)
    results = {}
    for routing in ROUTINGS:
        case = _case(routing, sizes)
        for i, options in enumerate(OPTIONS):
            results[routing, i] = _call(case, rows, options, group)
    results["logprobs"] = _logprobs(_case("grpo", sizes), rows, group)
    try:  # ranks that pass different tokens: an error on every rank, not a hang or a wrong number
        n = N - rank
        sk.fused_logprobs(torch.randn(n, 4), torch.randn(sizes[rank], 4), torch.zeros(n, dtype=torch.long),
                          vocab_parallel_group=group)
    except ValueError as e:
        results["mismatch"] = str(e)
    try:  # the same shapes, other ids (each rank handed its own data): the loss of nothing, silently
        sk.fused_srpo_loss(torch.randn(N, 4), torch.randn(sizes[rank], 4), torch.full((N,), rank), 1.0,
                           vocab_parallel_group=group)
    except ValueError as e:
        results["other_ids"] = str(e)
    try:  # a sampled token that the last block's bias masks: the same error on every rank, the holder's with it
        case = _case("grpo", sizes)
        v = sum(sizes)
        case["token_ids"][5] = masked = int(torch.isneginf(case["bias"]).nonzero()[0])
        case["loss_mask"][5] = True
        assert masked >= v - sizes[-1]
        _call(case, rows, {}, group)
    except ValueError as e:
        results["masked_target"] = str(e)
    # Data only the last rank holds makes an error there: every rank must raise it, not leave the others waiting in
    # the chunk loop's collectives (a hang).
    for name, poison in (("nan_block", torch.nan), ("huge_block", 1e38)):
        case = _case("mixed", sizes)
        case["weight"][sum(sizes) - 1, 0] = poison
        try:
            _call(case, rows, {}, group)
        except ValueError as e:
            results[name] = str(e)
    # A rank's own block failing a check that the others pass: every rank raises (it alone raising left the others
    # waiting in the next collective), the owner its own error.
    for name, spoil in (("dtype", lambda w: w.double()), ("not_a_matrix", lambda w: w[0])):
        case = _case("mixed", sizes)
        weight = case["weight"][_block(sizes, rank)].float()
        try:
            sk.fused_srpo_loss(case["hidden"].float(), spoil(weight) if rank == world - 1 else weight,
                               case["token_ids"], 1.0, backend="torch", vocab_parallel_group=group)
        except (ValueError, TypeError) as e:
            results[name] = str(e)
    for name, (edit, _) in DISAGREEMENTS.items():
        case, options = _case("mixed", sizes), {}
        if rank == world - 1:
            edit(case, options)
        try:
            _call(case, rows, options, group, chunk_size=options.pop("chunk_size", 16))
        except ValueError as e:
            results[name] = str(e)
    try:  # dh is summed over the ranks: one rank not asking for it left the others waiting for its share
        case = _case("mixed", sizes)
        with torch.no_grad() if rank == world - 1 else contextlib.nullcontext():
            _call(case, rows, {}, group)
    except (ValueError, RuntimeError) as e:
        results["hidden_grad"] = str(e)
    # No distilled token: teacher_hidden None on one rank, [0, H] on another, is the same (it joins no collective).
    case = _case("grpo", sizes)
    case["teacher_hidden"] = None if rank == world - 1 else torch.zeros(0, case["hidden"].shape[1])
    results["no_teacher"] = _call(case, rows, {}, group)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # leave together: gloo torn down under a rank still writing can abort it
    dist.destroy_process_group()


def _close(actual, expected, what):
    """To 1e-5 of the tensor's scale: a sum split across ranks rounds in another order. (With ref_beta, dh reaches
    5e5 through the k3 penalty of tokens deep in the tail; the unsharded fp32 call is itself 4e-5 off fp64, relative,
    on entries of 200.)"""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world,sizes", LAYOUTS, ids=[f"{w}ranks" for w, _ in LAYOUTS])
def test_sharded_call_equals_unsharded(world, sizes):
    with tempfile.TemporaryDirectory() as tmp:
        spawn_within(300, _worker, args=(world, sizes, os.path.join(tmp, "init"), tmp), nprocs=world)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    full = slice(0, sum(sizes))
    for routing in ROUTINGS:
        case = _case(routing, sizes)
        for i, options in enumerate(OPTIONS):
            want = _call(case, full, options)
            for r, got in enumerate(ranks):
                got, what = got[routing, i], f"{routing} {options} rank {r}"
                for key in ("loss", "per_token", "dh"):
                    _close(got[key], want[key], f"{what} {key}")
                _close(got["dw"], want["dw"][_block(sizes, r)], f"{what} dW")
                _close(got["db"], want["db"][_block(sizes, r)], f"{what} db")
    want = _logprobs(_case("grpo", sizes), full)
    for r, got in enumerate(ranks):
        for key in ("per_token", "dh"):
            _close(got["logprobs"][key], want[key], f"fused_logprobs rank {r} {key}")
        _close(got["logprobs"]["dw"], want["dw"][_block(sizes, r)], f"fused_logprobs rank {r} dW")
        assert "every rank must pass the same tokens" in got.get("mismatch", "")
        assert "token_ids differ between ranks" in got.get("other_ids", "")
        assert "1 token(s) in the loss sample a vocabulary entry that bias masks" in got.get("masked_target", "")
        assert ("token_ids[5] =" in got["masked_target"]) == (r == world - 1)
        assert f"weight must be finite everywhere: it holds NaN or inf (rank(s) [{world - 1}]" in got["nan_block"]
        assert "give logits (h W^T + b) / T that can reach" in got["huge_block"]
        own = r == world - 1
        assert ("weight must have hidden's dtype" if own else f"rank(s) [{world - 1}] refused their arguments") \
            in got.get("dtype", "")
        assert f"block of the lm_head under vocab_parallel_group; rank(s) [{world - 1}] passed something else" \
            in got.get("not_a_matrix", "")
        for name, (_, error) in DISAGREEMENTS.items():
            if name == "route_shape" and own:
                error = "route must have shape"
            assert error in got.get(name, ""), (name, r)
        assert f"hidden requires grad (under grad mode) on rank(s) {list(range(world - 1))}" in got["hidden_grad"]
    want = _call(_case("grpo", sizes), full, {})
    for r, got in enumerate(ranks):
        _close(got["no_teacher"]["loss"], want["loss"], f"rank {r} without teacher_hidden")


def test_bad_arguments():
    weight, hidden = torch.randn(10, 4), torch.randn(3, 4)
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        sk.fused_logprobs(hidden, weight, ids, vocab_parallel_group=object())
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch'"):
        sk.fused_srpo_loss(hidden, weight, ids, 1.0, backend="cpu", vocab_parallel_group=object())



# ---------------------------------------------------------------- random layouts
def _random_problems(count=32, world=3, seed=11):
    """Random block sizes (empty blocks too), options and problems, some with a block masked by -inf bias or with
    twin rows across blocks; sharp rows (large weights) as well as flat ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        v = rng.randrange(2, 300)
        cuts = sorted(rng.randrange(0, v + 1) for _ in range(world - 1))
        if rng.random() < 0.3:  # block j empty
            j = rng.randrange(world - 1)
            cuts[j] = cuts[j - 1] if j else 0
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [v])]
        problem = dict(seed=rng.randrange(10 ** 6), n=rng.randrange(1, 30), h=rng.randrange(1, 20), v=v,
                       sd_frac=rng.random(), mask_frac=rng.choice([0.0, rng.random()]), ref=rng.random() < 0.3,
                       scale=math.exp(rng.uniform(math.log(0.05), math.log(8))))
        options = dict(alpha=rng.choice([0.0, 1.0, rng.random()]), topk=rng.choice([None, rng.randrange(1, v + 1)]),
                       topk_tail=rng.random() < 0.6, temperature=math.exp(rng.uniform(-1, 1)),
                       reduction=rng.choice(["mean", "sum", "none"]), entropy_beta=rng.choice([0.0, 1.0, 20.0]))
        if problem["ref"]:
            options["ref_beta"] = rng.uniform(0, 0.3)
        out.append((sizes, problem, options, rng.choice(["", "masked_block", "twins"])))
    return out


def _random_case(sizes, problem, edit):
    case = make_case(**problem)
    if edit == "twins" and problem["v"] >= 2:
        k = problem["v"] // 2
        case["weight"][k:2 * k] = case["weight"][:k]
        case["bias"][k:2 * k] = case["bias"][:k]
    if edit == "masked_block":  # the largest block that no token samples from, all -inf
        start = 0
        for size in sizes:
            block = range(start, start + size)
            if 0 < size < problem["v"] and not any(int(t) in block for t in case["token_ids"]):
                case["bias"][start:start + size] = -torch.inf
                break
            start += size
    return case


def _random_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results = []
    for sizes, problem, options, edit in _random_problems(world=world):
        case = _random_case(sizes, problem, edit)
        results.append(_call(case, _block(sizes, rank), options, group, chunk_size=7))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_random_layouts_equal_unsharded():
    """32 random problems over 3 ranks with random block sizes (empty ones included), masked blocks and twin rows
    across blocks: every rank's outputs and gradients are the unsharded call's, or no further from fp64 than 5x
    the unsharded fp32 call (rows so sharp that a gradient vanishes, ~1e-13, differ in their rounding)."""
    world = 3
    with tempfile.TemporaryDirectory() as tmp:
        spawn_within(300, _random_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    for i, (sizes, problem, options, edit) in enumerate(_random_problems(world=world)):
        case = _random_case(sizes, problem, edit)
        full = slice(0, problem["v"])
        want = _call(case, full, options, chunk_size=7)
        exact = _call(case, full, options, dtype=torch.float64, fn=sk.reference.srpo_loss)
        if not torch.isfinite(exact["loss"]).all() or float(exact["loss"].abs().max()) > 1e6:
            continue  # k3 of an absurd token: beyond fp32 for every implementation
        for r in range(world):
            block = _block(sizes, r)
            for key, got in ranks[r][i].items():
                ref, truth = (want[key], exact[key]) if key not in ("dw", "db") else (want[key][block],
                                                                                     exact[key][block])
                if not got.numel() or torch.equal(got, ref) or max_rel_err(got, ref) < 1e-5:
                    continue
                assert max_rel_err(got, truth) <= max(1e-5, 5 * max_rel_err(ref, truth)), \
                    (i, r, key, sizes, problem, options, edit)
