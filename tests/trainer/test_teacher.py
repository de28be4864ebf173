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


def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think> x <think>c</think>y") == "x y"


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
