"""workspace: the chunk loop's buffers are reused between calls on the CPU, never shared by two at once, bounded,
and what a buffer held before never reaches a result."""
import pytest
import torch

import srpo_kernels as sk
from cases import assert_bitwise_equal, make_case, run
from srpo_kernels import workspace
from srpo_kernels.chunk_loop import CHUNK_BYTES

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def empty_pool():
    sk.release_workspace()
    yield
    sk.release_workspace()


def test_a_buffer_given_back_is_taken_again():
    a = workspace.take(1000, torch.float32, CPU)
    workspace.give_back(a)
    b = workspace.take(600, torch.float32, CPU)  # smaller requests reuse it too
    assert b.data_ptr() == a.data_ptr()


def test_buffers_in_use_are_never_shared():
    a = workspace.take(1000, torch.float32, CPU)
    b = workspace.take(1000, torch.float32, CPU)  # a second caller while `a` is out: its own buffer
    assert a.data_ptr() != b.data_ptr()


def test_the_pool_keeps_one_buffer_per_dtype_the_largest():
    small, large = workspace.take(10, torch.float32, CPU), workspace.take(1000, torch.float32, CPU)
    workspace.give_back(large)
    workspace.give_back(small)
    workspace.give_back(workspace.take(7, torch.bfloat16, CPU))
    assert workspace.kept_bytes() == 1000 * 4 + 7 * 2
    assert workspace.take(2000, torch.float32, CPU).numel() == 2000  # too small: replaced, not grown in place
    sk.release_workspace()
    assert workspace.kept_bytes() == 0


def test_what_is_kept_is_bounded(monkeypatch):
    assert workspace.MAX_KEPT_BYTES >= 2 * CHUNK_BYTES  # the default sizing's largest buffer is kept
    monkeypatch.setattr(workspace, "MAX_KEPT_BYTES", 400)
    workspace.give_back(workspace.take(101, torch.float32, CPU))
    assert workspace.kept_bytes() == 0
    workspace.give_back(workspace.take(100, torch.float32, CPU))
    assert workspace.kept_bytes() == 400


def test_other_devices_are_left_to_their_allocator():
    workspace.give_back(workspace.take(100, torch.float32, torch.device("meta")))
    assert workspace.kept_bytes() == 0


def test_a_fused_call_reuses_the_last_calls_workspace():
    case = make_case(seed=3, n=40, v=300)
    run(sk.fused_srpo_loss, case, torch.bfloat16, backend="cpu", chunk_size=16)
    kept = {key: buf.data_ptr() for key, buf in workspace._kept.items()}
    assert len(kept) == 2, "the call did not hand back its fp32 workspace and bf16 scratch"
    run(sk.fused_srpo_loss, case, torch.bfloat16, backend="cpu", chunk_size=16)
    assert {key: buf.data_ptr() for key, buf in workspace._kept.items()} == kept


def test_an_error_inside_the_loop_still_hands_the_buffers_back(monkeypatch):
    from srpo_kernels.backends.cpu import CpuRowOps

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(CpuRowOps, "distill_grad", fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(sk.fused_srpo_loss, make_case(seed=4, n=40, v=300), torch.float32, backend="cpu", chunk_size=16)
    assert workspace.kept_bytes() > 0


def _poison_pool():
    for buf in workspace._kept.values():
        buf.fill_(float("nan"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"topk": 5}, {"alpha": 0.0, "topk": 9, "topk_tail": False},
                                     {"reduction": "none"}])
def test_stale_workspace_contents_never_reach_a_result(backend, dtype, options):
    """Every pass writes a buffer before it reads it: a pool full of NaN gives bit for bit what fresh memory gives
    (a logits GEMM that added into its buffer instead of overwriting it would fail here)."""
    case = make_case(seed=11, n=45, v=257)
    fresh = run(sk.fused_srpo_loss, case, dtype, backend=backend, chunk_size=16, **options)
    assert workspace.kept_bytes() > 0
    _poison_pool()
    reused = run(sk.fused_srpo_loss, case, dtype, backend=backend, chunk_size=16, **options)
    assert_bitwise_equal(reused, fresh)


def test_a_later_call_leaves_an_earlier_calls_results_alone():
    """No result is a view of a kept buffer: the next call, on other inputs, overwrites those buffers."""
    first = run(sk.fused_srpo_loss, make_case(seed=5, n=45, v=257), torch.bfloat16, backend="cpu", chunk_size=16)
    saved = {k: v.clone() for k, v in first.items() if isinstance(v, torch.Tensor)}
    run(sk.fused_srpo_loss, make_case(seed=6, n=45, v=257), torch.bfloat16, backend="cpu", chunk_size=16)
    for key, value in saved.items():
        assert torch.equal(value, first[key]), key


def test_logprobs_hand_their_workspace_back_too():
    h, w = torch.randn(33, 8), torch.randn(150, 8, requires_grad=True)
    ids = torch.randint(0, 150, (33,))
    logp, entropy = sk.fused_logprobs(h, w, ids, with_entropy=True, backend="torch", chunk_size=16)
    assert workspace.kept_bytes() > 0
    _poison_pool()
    (logp + entropy).sum().backward()  # the backward's recompute takes the poisoned buffer
    grad = w.grad.clone()
    w.grad = None
    sk.release_workspace()
    again, entropy_again = sk.fused_logprobs(h, w, ids, with_entropy=True, backend="torch", chunk_size=16)
    (again + entropy_again).sum().backward()
    assert torch.equal(logp, again) and torch.equal(grad, w.grad)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_taken_under_inference_mode_serve_later_calls(backend, dtype):
    """A buffer first allocated under torch.inference_mode() (e.g. an old-logprob pass) is still writable by the
    training call after it, and the other way round."""
    h, ids = torch.randn(40, 16).to(dtype), torch.randint(0, 300, (40,))
    w = torch.randn(300, 16).to(dtype).requires_grad_()
    with torch.inference_mode():
        first = sk.fused_logprobs(h, w.detach(), ids, backend=backend, chunk_size=16)
    assert workspace.kept_bytes() > 0
    logp = sk.fused_logprobs(h, w, ids, backend=backend, chunk_size=16)
    logp.sum().backward()
    with torch.inference_mode():
        again = sk.fused_logprobs(h, w.detach(), ids, backend=backend, chunk_size=16)
    assert torch.equal(first, logp.detach()) and torch.equal(first, again)


def test_concurrent_calls_from_threads_match_serial_ones():
    import threading

    cases = [make_case(seed=20 + i, n=45, v=257) for i in range(4)]
    serial = [run(sk.fused_srpo_loss, c, torch.bfloat16, backend="cpu", chunk_size=16) for c in cases]
    results = [None] * len(cases)

    def call(i):
        for _ in range(3):
            results[i] = run(sk.fused_srpo_loss, cases[i], torch.bfloat16, backend="cpu", chunk_size=16)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results):
        assert_bitwise_equal(got, want)
