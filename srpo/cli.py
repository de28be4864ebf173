"""``srpo train`` and ``srpo compare`` (also ``python -m srpo``)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
import typing

from . import report
from .trainer import TrainConfig, Trainer


def _field_help():
    """The comment beside each TrainConfig field is its --help text."""
    src = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+= [^#\n]+#(.*)$", src, re.M)}


def _parse_optional(kind):
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    return parse


def _add_config_args(p: argparse.ArgumentParser, skip=()):
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        text = helps.get(f.name, "")
        own_default = "default" in text  # a comment may already say it (e.g. --lr's depends on the model)
        if not own_default:
            text += f" (default: {f.default})"
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif typing.get_origin(hint) is typing.Union:  # Optional[X]
            kind = [a for a in typing.get_args(hint) if a is not type(None)][0]
            none = "takes that default" if own_default else "disables"  # None: the model's rate, for --lr
            p.add_argument(flag, type=_parse_optional(kind), default=f.default, help=f"{text}; 'none' {none}")
        else:
            p.add_argument(flag, type=hint, default=f.default, help=text)


def _config(args, **over) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values.update(over)
    return TrainConfig(**values)


def cmd_train(args):
    trainer = Trainer(_config(args))
    history = trainer.train()
    print("\n" + report.table(history))
    paths = report.plots(history, trainer.out)
    print(f"\nmetrics: {trainer.out / 'metrics.jsonl'}\nplots:   " + ", ".join(str(p) for p in paths))


def _seeds(text: str) -> typing.List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected one or more distinct seeds, got {text!r}")
    return seeds


def cmd_compare(args):
    losses = ("fused", "reference") if args.loss == "both" else (args.loss,)
    seeds = args.seeds or [args.seed]
    out_dir = pathlib.Path(args.output_dir)
    results, learning = {}, {}
    for seed in seeds:
        for algo in ("srpo", "sdpo", "grpo"):
            for loss in losses:
                name = f"{algo}/{loss}" + (f"/seed{seed}" if len(seeds) > 1 else "")
                out = out_dir / algo / loss / (f"seed{seed}" if len(seeds) > 1 else "")
                print(f"--- {name} ---", flush=True)
                hist = Trainer(_config(args, algo=algo, loss=loss, seed=seed, output_dir=str(out),
                                       resume=False)).train()
                results[name] = hist
                learning.setdefault(f"{algo}/{loss}" if len(losses) > 1 else algo, []).append(hist)
    print("\nSame seed and prompts; mean per step:\n" + report.compare_table(results))
    print(f"plot: {report.compare_plot(results, out_dir / 'compare.png')}")
    if len(seeds) > 1:
        print(f"\nLearning over seeds {','.join(map(str, seeds))} (eval accuracy on held-out prompts):\n"
              + report.learning_table(learning))
        print(f"plot: {report.learning_plot(learning, out_dir / 'learning.png')}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="srpo", description="SRPO post-training on srpo_kernels' fused loss.")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one algorithm")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)
    compare = sub.add_parser("compare", help="srpo, sdpo and grpo on the same seed and prompts: step time by "
                                             "phase, teacher and student rows, peak memory")
    _add_config_args(compare, skip=("algo", "resume", "loss"))
    compare.add_argument("--loss", choices=("fused", "reference", "both"), default="fused",
                         help="fused (srpo_kernels), reference (materialised logits, as TRL and the official SDPO "
                              "compute it), or both, side by side (default: fused)")
    compare.add_argument("--seeds", type=_seeds, default=None,
                         help="comma-separated seeds (e.g. 0,1,2): every algorithm runs on each, and a learning "
                              "table and plot (eval accuracy over steps, response length) summarise them; "
                              "default: --seed alone")
    compare.set_defaults(func=cmd_compare)
    args = p.parse_args(argv)
    try:
        args.func(args)
    # Bad options, a missing file, an --output-dir that is a file, a non-finite gradient: one line, no traceback.
    except (ValueError, OSError, FloatingPointError) as exc:
        sys.exit(f"srpo: error: {exc}")


if __name__ == "__main__":
    main()
