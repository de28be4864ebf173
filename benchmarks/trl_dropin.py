"""The TRL drop-in against TRL itself: ``FusedGRPOTrainer`` vs TRL's ``GRPOTrainer`` on the embedded SmolLM2,
same seed, prompts and options; seconds per step and peak RSS, each trainer in a fresh process.

``python -m benchmarks.trl_dropin --steps 4`` (needs the ``[trl]`` extra and the embedded SmolLM2 of
``scripts/setup.sh``) prints one row per trainer.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.arguments import positive_int

TRAINERS = ("fused", "trl")


def _run_one(which: str, steps: int, rollouts: int, length: int, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.peak_memory import peak_rss_bytes
    from srpo.integrations.trl import FusedGRPOTrainer
    from srpo.models import load
    from srpo.tasks import Arithmetic, numeric

    torch.manual_seed(0)
    model, tok = load("smollm2")
    prompts = Arithmetic(1, "+-", seed=0).sample(64)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}], "answer": ex.answer}
                              for ex in prompts])

    def reward(completions, answer, **_):
        return [numeric(c[0]["content"], a) for c, a in zip(completions, answer)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimes()
    args = GRPOConfig(output_dir=f"/tmp/trl-dropin-{which}", per_device_train_batch_size=rollouts,
                      num_generations=4, max_completion_length=length, max_steps=steps, learning_rate=1e-6,
                      beta=0.0, use_cpu=True, bf16=bf16, report_to=[], save_strategy="no", logging_steps=1, seed=0)
    cls = FusedGRPOTrainer if which == "fused" else GRPOTrainer
    trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                  callbacks=[timer])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"trainer": which, "step_seconds": timer.times, "peak_rss_bytes": peak_rss_bytes(),
            "first_loss": losses[0] if losses else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--rollouts", type=positive_int, default=16, help="rollouts per step (4 per prompt)")
    p.add_argument("--length", type=positive_int, default=48, help="max completion tokens")
    p.add_argument("--bf16", action="store_true", help="TRL's default bf16 autocast (slow on a CPU without bf16 "
                                                       "units; off by default: fp32)")
    p.add_argument("--only", choices=TRAINERS, help="run one trainer in this process and print its JSON")
    a = p.parse_args()
    if a.only:
        print(json.dumps(_run_one(a.only, a.steps, a.rollouts, a.length, a.bf16)))
        return
    print(f"{'trainer':>8} {'s/step (median)':>16} {'peak RSS':>10} {'first loss':>11}")
    for which in TRAINERS:
        cmd = [sys.executable, "-m", "benchmarks.trl_dropin", "--only", which, "--steps", str(a.steps),
               "--rollouts", str(a.rollouts), "--length", str(a.length)] + (["--bf16"] if a.bf16 else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        times = sorted(r["step_seconds"])
        print(f"{which:>8} {times[len(times) // 2]:>16.1f} {r['peak_rss_bytes'] / 2**30:>8.2f} GB "
              f"{r['first_loss']!s:>11}", flush=True)


if __name__ == "__main__":
    main()
