"""srpo.models: the logit scale a model applies after its lm_head (read from its config) and check_head, each against
the model's own forward; the ids that end a response; loading a model whose attention transformers must choose."""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (pip install 'srpo-kernels[trainer]')")
import transformers  # noqa: E402

from srpo.models import backbone, check_head, load, logit_scale, stop_token_ids, tiny_tokenizer  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
# family -> (config overrides, expected scale): each family keeps the factor under another name, or in the hidden
# states (MiniCPM3: hidden_size / dim_model_base).
FAMILIES = {
    "Qwen3": ({}, 1.0),
    "Granite": (dict(logits_scaling=8.0), 1 / 8),
    "Cohere": (dict(logit_scale=0.0625), 0.0625),
    "MiniCPM3": (dict(dim_model_base=16, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, head_dim=8, num_key_value_heads=4), 0.25),
    "HyperCLOVAX": (dict(logits_scaling=0.5), 0.5),
    "FalconH1": (dict(lm_head_multiplier=0.3), 0.3),
}


def _model(family, **over):
    if not hasattr(transformers, f"{family}ForCausalLM"):
        pytest.skip(f"this transformers has no {family}ForCausalLM")
    config = getattr(transformers, f"{family}Config")(**{**SMALL, **over})
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_scale_is_what_the_model_applies_after_its_lm_head(family):
    over, expected = FAMILIES[family]
    model = _model(family, **over)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        head = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state)
    assert logit_scale(model) == pytest.approx(expected)
    torch.testing.assert_close(head * logit_scale(model), logits, rtol=1e-6, atol=1e-6)
    check_head(model, logit_scale(model))


def test_check_head_refuses_logits_that_are_not_the_scaled_lm_head():
    """A BERT-style decoder transforms the hidden states before its projection, and a scale under a name
    logit_scale does not read is a scale missed: either way the loss would score other logits."""
    with pytest.raises(ValueError, match="BertLMHeadModel's logits are not 1 x lm_head"):
        check_head(transformers.BertLMHeadModel(transformers.BertConfig(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            is_decoder=True)), 1.0)
    with pytest.raises(ValueError, match="GraniteForCausalLM's logits are not 1 x lm_head"):
        check_head(_model("Granite", logits_scaling=8.0), 1.0)
    # ELECTRA's head projects the hidden states to another size first: a refusal, not a shape error from F.linear
    with pytest.raises(ValueError, match="ElectraForCausalLM's logits are not 1 x lm_head.*relative error inf"):
        check_head(transformers.ElectraForCausalLM(transformers.ElectraConfig(
            vocab_size=97, embedding_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, is_decoder=True)), 1.0)


def test_a_model_that_soft_caps_its_logits_is_refused():
    """Gemma 2's c tanh(z / c) is no scale: the fused losses would score other logits than the model's. xLSTM caps
    its logits too, under another name."""
    with pytest.raises(ValueError, match="soft-caps its logits .*final_logit_softcapping=30.0"):
        logit_scale(_model("Gemma2", head_dim=16))
    if hasattr(transformers, "xLSTMConfig"):
        config = transformers.xLSTMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_heads=4)
        with pytest.raises(ValueError, match="soft-caps its logits .*output_logit_soft_cap=30.0"):
            logit_scale(transformers.xLSTMForCausalLM(config))


def test_backbone_of_a_class_that_lacks_its_own_prefix():
    """Llama4ForCausalLM names "language_model" as its base-model prefix but keeps its decoder in `model`: its
    base_model was the whole LM, whose output is logits, not hidden states."""
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama4ForCausalLM")
    config = transformers.Llama4TextConfig(**SMALL, head_dim=16, num_local_experts=2, intermediate_size_mlp=128)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(config).eval()
    assert model.base_model is model and backbone(model) is model.model
    check_head(model, logit_scale(model))


def test_a_scale_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="scales its logits by 0.0 .logit_scale"):
        logit_scale(_model("Cohere", logit_scale=0.0))


@pytest.mark.parametrize("own,expected", [([151645, 151643], [151645, 151643]), (151643, [151645, 151643]),
                                          (None, [151645]), ([151643, 151645], [151645, 151643])])
def test_stop_token_ids_are_the_tokenizers_eos_then_the_models_own(own, expected):
    """Qwen2.5-Instruct: its tokenizer's EOS is <|im_end|> (151645); its generation_config adds <|endoftext|>."""
    class Tokenizer:
        eos_token_id = 151645

    model = _model("Qwen3")
    model.generation_config.eos_token_id = own
    assert stop_token_ids(model, Tokenizer()) == expected


def test_a_model_without_sdpa_loads_and_is_judged_on_its_logits(tmp_path):
    """Gemma 2 has no sdpa attention: load() asked for it and transformers refused the model before anything could
    say what the trainer thinks of it (its soft-capped logits)."""
    tok = tiny_tokenizer()
    model = _model("Gemma2", head_dim=16, vocab_size=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load(str(tmp_path))
    assert type(loaded).__name__ == "Gemma2ForCausalLM"
    with pytest.raises(ValueError, match="soft-caps its logits"):
        logit_scale(loaded)
