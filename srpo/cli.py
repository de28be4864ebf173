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
        text = f"{helps.get(f.name, '')} (default: {f.default})"
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif typing.get_origin(hint) is typing.Union:  # Optional[X]
            kind = [a for a in typing.get_args(hint) if a is not type(None)][0]
            p.add_argument(flag, type=_parse_optional(kind), default=f.default, help=text + "; 'none' disables")
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


def cmd_compare(args):
    losses = ("fused", "reference") if args.loss == "both" else (args.loss,)
    results = {}
    for algo in ("srpo", "sdpo", "grpo"):
        for loss in losses:
            name = f"{algo}/{loss}"
            out = pathlib.Path(args.output_dir) / algo / loss
            print(f"--- {name} ---", flush=True)
            results[name] = Trainer(_config(args, algo=algo, loss=loss, output_dir=str(out), resume=False)).train()
    print("\nSame seed and prompts; mean per step:\n" + report.compare_table(results))
    print(f"plot: {report.compare_plot(results, pathlib.Path(args.output_dir) / 'compare.png')}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="srpo", description="SRPO post-training on srpo_kernels' fused loss.")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one algorithm", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(train)
    train.set_defaults(func=cmd_train)
    compare = sub.add_parser("compare", help="srpo, sdpo and grpo on the same seed and prompts: step time by "
                                             "phase, teacher and student rows, peak memory",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(compare, skip=("algo", "resume", "loss"))
    compare.add_argument("--loss", choices=("fused", "reference", "both"), default="fused",
                         help="fused (srpo_kernels), reference (materialised logits, as TRL and the official SDPO "
                              "compute it), or both, side by side (default: fused)")
    compare.set_defaults(func=cmd_compare)
    args = p.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"srpo: error: {exc}")


if __name__ == "__main__":
    main()
