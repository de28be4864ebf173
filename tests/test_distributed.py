"""Data parallel: with torch.distributed initialised, normalisers are global, so the DDP-averaged gradient of two
ranks (each holding half the tokens) equals the single-process full-batch gradient, and bad input on one rank is an
error on both, and so are ranks that differ in the options or in which normalisers they pass; one rank alone may
call it with both normalisers given. Two gloo processes on CPU."""
import os
import tempfile

import torch
import torch.distributed as dist

import srpo_kernels as sk
from cases import make_case
from processes import spawn_within

OPTIONS = [dict(), dict(topk=6, alpha=1.0), dict(ref_beta=0.1, alpha=0.0), dict(reduction="sum")]


def _loss_and_grads(case, rows, **options):
    hidden = case["hidden"][rows].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    route = case["route"][rows]
    teacher_index = (torch.cumsum(case["route"].long(), 0) - 1)[rows][route]
    out = sk.fused_srpo_loss(hidden, weight, case["token_ids"][rows], case["advantages"][rows].float(), route,
                             case["teacher_hidden"][teacher_index].float(), loss_mask=case["loss_mask"][rows],
                             ref_logprobs=case["ref_logprobs"][rows].float(), backend="cpu", **options)
    out.loss.backward()
    return hidden.grad, weight.grad


def _worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    case = make_case(seed=31, n=48, v=211, ref=True)
    rows = torch.arange(48)[rank::world]  # uneven SDPO counts per rank
    out = {}
    for i, options in enumerate(OPTIONS):
        gh, gw = _loss_and_grads(case, rows, **options)
        # "mean": DDP averages gradients over ranks; "sum" has no normaliser, so its gradients add up.
        scale = 1.0 if options.get("reduction") == "sum" else 1.0 / world
        dist.all_reduce(gw)
        full_h = torch.zeros(48, gh.shape[1])
        full_h[rows] = gh
        dist.all_reduce(full_h)
        out[i] = (full_h * scale, gw * scale)
    # Bad input on one rank only (NaN hidden states on rank 1): every rank raises, none waits in the collective.
    try:
        case = make_case(seed=31, n=48, v=211, ref=True)
        if rank == 1:
            case["hidden"][rows[0], 0] = float("nan")
        _loss_and_grads(case, rows)
    except ValueError as e:
        out["refused"] = str(e)
    # Ranks that differ in what decides the collectives (rank 1 passes a weight normaliser, or entropy_beta = 0,
    # and skipped the entropy-weight reduction rank 0 waited in) or in a normaliser: an error on both.
    for name, options in (("weight_normalizer", dict(weight_normalizer=0.5)), ("normalizer", dict(normalizer=24.0)),
                          ("options", dict(entropy_beta=0.0))):
        try:
            _loss_and_grads(make_case(seed=31, n=48, v=211, ref=True), rows, **(options if rank == 1 else {}))
        except ValueError as e:
            out[name] = str(e)
    if rank == 0:  # one rank alone (an evaluation on the main process) with both normalisers: no collective
        _loss_and_grads(make_case(seed=31, n=48, v=211, ref=True), rows, normalizer=24.0, weight_normalizer=0.5)
    if rank == 1:
        torch.save(out, result_file + ".rank1")
    if rank == 0:
        torch.save(out, result_file)
    dist.barrier()  # leave together: gloo torn down under a rank still writing can abort it
    dist.destroy_process_group()


def test_data_parallel_gradient_equals_full_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        spawn_within(300, _worker, args=(2, init_file, result_file), nprocs=2)
        results = torch.load(result_file)
        rank1 = torch.load(result_file + ".rank1")
    case = make_case(seed=31, n=48, v=211, ref=True)
    for i, options in enumerate(OPTIONS):
        full_h, full_w = _loss_and_grads(case, torch.arange(48), **options)
        dp_h, dp_w = results[i]
        assert torch.allclose(dp_h, full_h, rtol=1e-5, atol=1e-7), options
        assert torch.allclose(dp_w, full_w, rtol=1e-5, atol=1e-7), options
    assert "1 other data-parallel rank(s) refused their inputs" in results["refused"]
    assert "hidden must be finite everywhere" in rank1["refused"]
    for out in (results, rank1):
        assert "weight_normalizer is given on 1 of 2 data-parallel ranks" in out.get("weight_normalizer", "")
        assert "normalizer is given on 1 of 2 data-parallel ranks" in out.get("normalizer", "")
        assert "the loss options differ between data-parallel ranks" in out.get("options", "")
