"""End-of-run summary: a table on stdout and PNG plots (reward, route fraction, step time by phase)."""
from __future__ import annotations

import pathlib
import statistics
from typing import Dict, List

PHASES = ("time_generate", "time_teacher", "time_old_logprobs", "time_loss", "time_optim")


def steps_of(history: List[dict]) -> List[dict]:
    """The training steps' records (the step-0 record holds only the baseline evaluation)."""
    return [r for r in history if "reward_mean" in r]


def evaluations(history: List[dict]) -> List[tuple]:
    return [(r["step"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]


def table(history: List[dict]) -> str:
    cols = ("step", "reward_mean", "accuracy", "sdpo_rollouts", "teacher_rows", "student_rows", "kl",
            "clip_fraction", "response_len", "peak_memory_mb") + PHASES
    lines = [" ".join(f"{c.replace('time_', 't_').replace('_memory', ''):>13}" for c in cols)]
    for rec in steps_of(history):
        lines.append(" ".join(f"{rec.get(c, 0):>13.3f}" if isinstance(rec.get(c, 0), float) else f"{rec[c]:>13}"
                              for c in cols))
    evals = evaluations(history)
    if evals:
        lines.append("\neval accuracy (held-out prompts): "
                     + ", ".join(f"step {s}: {a:.3f}" for s, a in evals))
    return "\n".join(lines)


def plots(history: List[dict], out_dir: pathlib.Path) -> List[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = evaluations(history)
    history = steps_of(history)
    steps = [r["step"] for r in history]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward_mean"] for r in history], marker="o", label="train reward")
    if evals:
        ax.plot(*zip(*evals), marker="s", label="eval accuracy (held-out prompts)")
    ax.set(xlabel="step", ylabel="reward / accuracy", title="Reward")
    ax.legend()
    paths.append(_save(fig, out_dir / "reward.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    total = [max(r["rollouts"], 1) for r in history]
    ax.plot(steps, [r["sdpo_rollouts"] / t for r, t in zip(history, total)], marker="o", label="SDPO (distilled)")
    ax.plot(steps, [r["grpo_rollouts"] / t for r, t in zip(history, total)], marker="o", label="GRPO")
    ax.set(xlabel="step", ylabel="fraction of rollouts", title="Routing", ylim=(0, 1))
    ax.legend()
    paths.append(_save(fig, out_dir / "routing.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(history)
    for phase in PHASES:
        vals = [r.get(phase, 0.0) for r in history]
        ax.bar(steps, vals, bottom=bottom, label=phase.replace("time_", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="step", ylabel="seconds", title="Step time by phase")
    ax.legend()
    paths.append(_save(fig, out_dir / "step_time.png"))
    return paths


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


COMPARED = ("accuracy", "teacher_rows", "student_rows", "peak_memory_mb")


def compare_table(results: Dict[str, List[dict]]) -> str:
    """Per run (algorithm, loss): mean per step of accuracy, teacher and student rows, peak memory and time by
    phase; same seed and prompts in every run."""
    lines = [f"{'run':>16} " + " ".join(f"{c.replace('_memory', ''):>13}" for c in COMPARED) + " "
             + " ".join(f"{p.replace('time_', 't_'):>14}" for p in PHASES) + f" {'t_total':>9}"]
    for name, hist in results.items():
        hist = steps_of(hist)
        n = max(len(hist), 1)
        mean = {k: sum(r.get(k, 0.0) for r in hist) / n for k in COMPARED + PHASES}
        lines.append(f"{name:>16} " + " ".join(f"{mean[c]:>13.2f}" for c in COMPARED) + " "
                     + " ".join(f"{mean[p]:>14.3f}" for p in PHASES) + f" {sum(mean[p] for p in PHASES):>9.3f}")
    return "\n".join(lines)


def compare_plot(results: Dict[str, List[dict]], path: pathlib.Path) -> pathlib.Path:
    """Mean step time by phase (stacked) and peak memory of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(10, 3.8))
    bottom = [0.0] * len(names)
    for phase in PHASES:
        vals = []
        for name in names:
            hist = steps_of(results[name])
            vals.append(sum(r.get(phase, 0.0) for r in hist) / max(len(hist), 1))
        ax.bar(names, vals, bottom=bottom, label=phase.replace("time_", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="seconds per step", title="Step time by phase")
    ax.legend(fontsize=7)
    peaks = [max((r.get("peak_memory_mb", 0.0) for r in steps_of(results[n])), default=0.0) for n in names]
    mem.bar(names, peaks)
    mem.set(ylabel="MB", title="Peak memory per step (max over steps)")
    for a in (ax, mem):
        a.tick_params(axis="x", rotation=30, labelsize=7)
    return _save(fig, path)


def _spread(values: List[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else \
        f"{values[0]:.3f}"


def learning_table(runs: Dict[str, List[List[dict]]]) -> str:
    """Per algorithm, over its seeds (mean ± sd): eval accuracy at step 0, the early gain (first evaluation after
    step 0 minus step 0), the final accuracy, its gain, and the mean response length of the last third of the steps."""
    cols = ("eval step 0", "early gain", "final eval", "final gain", "response len")
    lines = [f"{'algo':>16} {'seeds':>6} " + " ".join(f"{c:>15}" for c in cols)]
    for name, hists in runs.items():
        first, early, final, length = [], [], [], []
        for hist in hists:
            evals = evaluations(hist)
            if not evals:
                continue
            first.append(evals[0][1])
            early.append((evals[1][1] if len(evals) > 1 else evals[0][1]) - evals[0][1])
            final.append(evals[-1][1])
            steps = steps_of(hist)
            tail = steps[-max(1, len(steps) // 3):]
            length.append(sum(r["response_len"] for r in tail) / max(len(tail), 1))
        if not first:
            continue
        gains = [f - s for f, s in zip(final, first)]
        lines.append(f"{name:>16} {len(first):>6} " + " ".join(
            f"{_spread(v):>15}" for v in (first, early, final, gains, length)))
    return "\n".join(lines)


def learning_plot(runs: Dict[str, List[List[dict]]], path: pathlib.Path) -> pathlib.Path:
    """Eval accuracy and response length over the steps: each algorithm's mean over its seeds, with the range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, length) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, hists in runs.items():
        for ax, points in ((acc, [evaluations(h) for h in hists]),
                           (length, [[(r["step"], r["response_len"]) for r in steps_of(h)] for h in hists])):
            steps = sorted({s for pts in points for s, _ in pts})
            per_step = [[v for pts in points for s, v in pts if s == step] for step in steps]
            line, = ax.plot(steps, [statistics.mean(v) for v in per_step], marker="o", label=name)
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2,
                            color=line.get_color())
    seeds = max(len(h) for h in runs.values())
    acc.set(xlabel="step", ylabel="eval accuracy", title=f"Held-out accuracy (mean and range, {seeds} seeds)")
    length.set(xlabel="step", ylabel="tokens", title="Response length")
    acc.legend()
    return _save(fig, path)
