import json
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # coin_verifier for "module:function" verifiers


@pytest.fixture
def coin_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": i}) for i in range(6)) + "\n")
    return str(path)


def tiny_config(tmp_path, **over):
    from srpo import TrainConfig

    cfg = dict(model="tiny", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, output_dir=str(tmp_path),
               progress=False, eval_prompts=2, lr=1e-3)
    cfg.update(over)
    return TrainConfig(**cfg)


def tiny_granite(tokenizer, logits_scaling=8.0):
    """A random 2-layer Granite, which divides its logits by `logits_scaling` (see models.logit_scale)."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=logits_scaling,
                           tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return GraniteForCausalLM(config)


def tiny_qwen3_next(tokenizer):
    """A random 2-layer Qwen3-Next: one linear-attention layer, one full-attention layer, MoE."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                             layer_types=["linear_attention", "full_attention"], tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return Qwen3NextForCausalLM(config)
