"""Which of the installed transformers' causal LMs the trainers can take: for each class in
MODEL_FOR_CAUSAL_LM_MAPPING, a random model from a small config, judged by srpo.models.logit_scale and check_head
(are its logits its logit scale times lm_head(hidden states), which is what the fused loss computes?).

    .venv/bin/python scripts/sweep_model_heads.py [--seconds 20]

Prints one line per model type: ok (with the scale), refused (why), or not built (the small config does not suit
that architecture: not judged). A few minutes on 2 CPU cores. Run it after a transformers upgrade: a new family that
scales its logits under a new name shows up as refused, not as a silently wrong loss.
"""
import argparse
import collections
import signal
import warnings


def small_config(model_type):
    from transformers import AutoConfig

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, n_embd=64, n_layer=2, n_head=4, max_position_embeddings=256,
                 n_positions=256, tie_word_embeddings=False)
    default = AutoConfig.for_model(model_type)
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if hasattr(default, k)})


def judge(model_type):
    import torch
    from transformers import AutoModelForCausalLM

    from srpo.models import check_head, logit_scale

    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small_config(model_type)).eval()
        with torch.no_grad():
            model(input_ids=torch.arange(4)[None], use_cache=False)
    except Exception as exc:  # noqa: BLE001 - any architecture-specific failure means "not judged"
        return f"not built ({type(exc).__name__})"
    try:
        scale = logit_scale(model)
        check_head(model, scale)
    except ValueError as exc:
        return f"refused: {str(exc).split(':')[0]}"
    return f"ok (scale {scale:g})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="time limit per model type")
    args = parser.parse_args()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    def too_long(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, too_long)
    counts = collections.Counter()
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        signal.alarm(args.seconds)
        try:
            verdict = judge(model_type)
        except TimeoutError:
            verdict = f"not built (over {args.seconds} s)"
        finally:
            signal.alarm(0)
        counts[verdict.split(" (")[0].split(":")[0]] += 1  # ok, refused, not built
        print(f"{model_type:32s} {verdict}", flush=True)
    print(", ".join(f"{n} {kind}" for kind, n in counts.items()))


if __name__ == "__main__":
    main()
