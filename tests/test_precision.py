"""Low precision: a bf16/fp16 result must be no worse than the naive bf16/fp16 PyTorch result plus a small tolerance,
both judged against fp64 on the same rounded inputs, as means over several random cases (see low_precision_errors)."""
import pytest
import torch

from cases import fused, low_precision_errors, make_case
from srpo_kernels import gemm

KEYS = ("loss", "logprobs", "entropy", "teacher_entropy", "divergence", "grad_hidden", "grad_weight", "grad_bias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("options", [dict(), dict(topk=6, alpha=1.0), dict(alpha=0.0, reduction="none")], ids=str)
@pytest.mark.parametrize("native", [True, False], ids=["low-precision-gemms", "widened-gemms"])
def test_low_precision_no_worse_than_naive(dtype, backend, options, native, monkeypatch):
    # Both CPU policies of gemm.py, whatever this CPU has (the choice is by its feature flags).
    monkeypatch.setattr(gemm, "native_low_precision", lambda *_: native)
    errors = low_precision_errors(fused(backend, chunk_size=16), dtype, keys=KEYS, **options)
    for k, (ours, naive) in errors.items():
        assert ours <= naive + 1e-3, f"{k}: ours {ours:.2e} vs naive {naive:.2e} (means over the seeds)"


def test_low_precision_grads_keep_input_dtype():
    case = make_case(seed=22)
    h = case["hidden"].bfloat16().requires_grad_()
    w = case["weight"].bfloat16().requires_grad_()
    import srpo_kernels as sk
    out = sk.fused_srpo_loss(h, w, case["token_ids"], case["advantages"].float(), case["route"],
                             case["teacher_hidden"].bfloat16())
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
