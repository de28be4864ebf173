import torch

from srpo.models import tiny_model, tiny_tokenizer
from srpo.teacher import EMATeacher, strip_thinking, teacher_prompt_ids


def test_teacher_input_layout_is_token_exact_on_tiny():
    tok = tiny_tokenizer()
    ids = teacher_prompt_ids(tok, "What is 2 + 3?", "<think>hmm, 2+3</think>The answer is 5.")
    expected = ("<|user|>What is 2 + 3?\n\nCorrect solution:\n\nThe answer is 5.\n\n"
                "Correctly solve the original question.<|end|><|assistant|>")
    specials = {s: tok.convert_tokens_to_ids(s) for s in ("<|user|>", "<|end|>", "<|assistant|>")}
    body = expected[len("<|user|>"):-len("<|end|><|assistant|>")]
    assert ids == [specials["<|user|>"]] + [tok.convert_tokens_to_ids(c) for c in body] + \
        [specials["<|end|>"], specials["<|assistant|>"]]
    assert tok.decode(ids) == expected


def test_a_tokenizer_without_chat_template_gets_plain_text_prompts():
    """A base model's tokenizer has no chat template: apply_chat_template raised at the first rollout."""
    tok = tiny_tokenizer()
    tok.chat_template = None
    ids = teacher_prompt_ids(tok, "What is 2 + 3?", "The answer is 5.")
    assert tok.decode(ids) == ("What is 2 + 3?\n\nCorrect solution:\n\nThe answer is 5.\n\n"
                               "Correctly solve the original question.")


def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think> x <think>c</think>y") == "x y"
    assert strip_thinking("opened in the prompt\n</think>\n\nThe answer is 5.") == "The answer is 5."
    assert strip_thinking("The answer is 5.<think>cut off while") == "The answer is 5."
    assert strip_thinking("no tags") == "no tags"


def test_ema_update():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    ema = EMATeacher(model, rate=0.25)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for b, t, s in zip(before, ema.model.parameters(), model.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * s)
        assert not t.requires_grad


def test_ema_of_a_bf16_model_follows_updates_smaller_than_its_rounding():
    """A bf16 policy drifting 1% a step: each EMA update (5% of the 1% gap) is below half a bf16 ulp of the weight,
    so without the residual the teacher never moved. It must track the exact EMA to bf16's rounding."""
    model = tiny_model(tiny_tokenizer()).to(torch.bfloat16)
    ema = EMATeacher(model, rate=0.05)
    exact = [p.double() for p in ema.model.parameters()]
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        ema.update(model)
        exact = [(1 - 0.05) * e + 0.05 * p.double() for e, p in zip(exact, model.parameters())]
    for e, t in zip(exact, ema.model.parameters()):
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.double(), e.to(torch.bfloat16).double(), rtol=2 ** -8, atol=0)


def test_ema_state_round_trips_and_older_checkpoints_load():
    model = tiny_model(tiny_tokenizer()).to(torch.bfloat16)
    ema = EMATeacher(model, rate=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    ema.update(model)
    again = EMATeacher(tiny_model(tiny_tokenizer(), seed=3).to(torch.bfloat16))
    again.load_state_dict(ema.state_dict())
    for a, b in zip(ema.state_dict()["residuals"] + list(ema.model.parameters()),
                    again.state_dict()["residuals"] + list(again.model.parameters())):
        assert a is b is None or torch.equal(a, b)
    older = EMATeacher(tiny_model(tiny_tokenizer(), seed=3).to(torch.bfloat16))
    older.load_state_dict(ema.model.state_dict())  # what checkpoints held before the residuals
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), older.model.parameters()))
