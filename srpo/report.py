"""End-of-run summary: a table on stdout and PNG plots (reward, route fraction, step time by phase)."""
from __future__ import annotations

import pathlib
from typing import Dict, List

PHASES = ("time_generate", "time_teacher", "time_loss", "time_optim")


def table(history: List[dict]) -> str:
    cols = ("step", "reward_mean", "accuracy", "sdpo_rollouts", "teacher_rows", "kl", "clip_fraction",
            "response_len") + PHASES
    lines = [" ".join(f"{c.replace('time_', 't_'):>13}" for c in cols)]
    for rec in history:
        lines.append(" ".join(f"{rec[c]:>13.3f}" if isinstance(rec[c], float) else f"{rec[c]:>13}" for c in cols))
    return "\n".join(lines)


def plots(history: List[dict], out_dir: pathlib.Path) -> List[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward_mean"] for r in history], marker="o", label="train reward")
    evals = [(r["step"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
    if evals:
        ax.plot(*zip(*evals), marker="s", label="eval accuracy (greedy)")
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
        vals = [r[phase] for r in history]
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


def compare_table(results: Dict[str, List[dict]]) -> str:
    """Mean per-step time by phase, teacher rows and accuracy of each algorithm (same seed and prompts)."""
    lines = [f"{'algo':>6} {'accuracy':>9} {'sdpo_rollouts':>14} {'teacher_rows':>13} "
             + " ".join(f"{p.replace('time_', 't_'):>11}" for p in PHASES) + f" {'t_total':>9}"]
    for algo, hist in results.items():
        n = len(hist)
        mean = {k: sum(r[k] for r in hist) / n for k in ("accuracy", "sdpo_rollouts", "teacher_rows") + PHASES}
        lines.append(f"{algo:>6} {mean['accuracy']:>9.3f} {mean['sdpo_rollouts']:>14.2f} {mean['teacher_rows']:>13.2f} "
                     + " ".join(f"{mean[p]:>11.3f}" for p in PHASES) + f" {sum(mean[p] for p in PHASES):>9.3f}")
    return "\n".join(lines)
