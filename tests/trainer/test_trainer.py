"""The trainer on the tiny model: routing records, teacher only on distilled rows, loss = reference loss,
verifier errors, and an exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import srpo_kernels
from conftest import tiny_config
from srpo import Trainer
from srpo.checkpoint import load as load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _records(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def test_srpo_runs_teacher_only_on_distilled_rollouts(tmp_path, coin_dataset):
    hist = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=3)).train()
    assert len(hist) == 3 and _records(tmp_path) == hist
    assert all(r["teacher_rows"] == r["sdpo_rollouts"] for r in hist)
    assert sum(r["sdpo_rollouts"] for r in hist) > 0  # the coin makes mixed groups
    assert all(r["sdpo_rollouts"] + r["grpo_rollouts"] == r["rollouts"] for r in hist)
    for key in ("step", "reward_mean", "accuracy", "distill_weight_mean", "kl", "clip_fraction", "response_len",
                "time_generate", "time_teacher", "time_loss", "time_optim"):
        assert key in hist[0]
    assert "eval_accuracy" in hist[-1]


def test_grpo_has_no_teacher(tmp_path, coin_dataset):
    hist = Trainer(tiny_config(tmp_path, algo="grpo", task=coin_dataset, verifier="coin_verifier:coin")).train()
    assert all(r["teacher_rows"] == 0 and r["time_teacher"] == 0 and r["sdpo_rollouts"] == 0 for r in hist)


def test_sdpo_has_no_grpo_term(tmp_path, coin_dataset):
    hist = Trainer(tiny_config(tmp_path, algo="sdpo", task=coin_dataset, verifier="coin_verifier:coin",
                               steps=3)).train()
    assert all(r["grpo_rollouts"] == 0 and r["teacher_rows"] == r["sdpo_rollouts"] for r in hist)


@pytest.mark.parametrize("micro_batch", [0, 3])
def test_trainer_loss_equals_reference_loss(tmp_path, coin_dataset, micro_batch):
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=1,
                                  micro_batch=micro_batch))
    for _ in range(4):  # until a step has both branches
        x = trainer.train_step().loss_inputs
        if x["teacher_hidden"] is not None and not bool(x["route"].all()):
            break
    assert x["teacher_hidden"] is not None, "no mixed step in 4 tries"
    ref = srpo_kernels.reference.srpo_loss(x["hidden"].double(), x["weight"].double(), x["token_ids"],
                                           x["advantages"].double(), x["route"], x["teacher_hidden"].double(),
                                           bias=x["bias"], **x["options"])
    assert abs(ref.loss.item() - x["loss"]) <= 1e-5 * max(1.0, abs(ref.loss.item()))


def test_verifier_errors_give_zero_reward_and_training_goes_on(tmp_path, coin_dataset):
    hist = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:broken")).train()
    assert all(r["reward_mean"] == 0 for r in hist)
    assert hist[-1]["verifier_errors"] >= 2 * 2 * 4  # every rollout of both steps


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    return subprocess.Popen([sys.executable, "-m", "srpo", "train", "--model", "tiny", "--no-progress", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_train_writes_records(tmp_path):
    proc = _cli(["--algo", "srpo", "--steps", "2", "--output-dir", str(tmp_path), "--max-new-tokens", "6"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and all(r["teacher_rows"] == r["sdpo_rollouts"] for r in recs)
    assert (tmp_path / "reward.png").is_file() and "teacher_rows" in out


def test_cli_help_documents_every_option():
    from srpo import TrainConfig
    import dataclasses

    out = subprocess.run([sys.executable, "-m", "srpo", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name


@pytest.mark.slow
def test_sigkill_and_resume_reaches_the_same_parameters(tmp_path, coin_dataset):
    args = ["--task", coin_dataset, "--verifier", "coin_verifier:coin", "--steps", "6", "--max-new-tokens", "48",
            "--group-size", "8", "--prompts-per-step", "4", "--lr", "1e-3", "--eval-prompts", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _cli(args + ["--output-dir", str(straight)])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()

    proc = _cli(args + ["--output-dir", str(killed)])
    deadline = time.time() + 600
    while time.time() < deadline:
        state = load_checkpoint(killed) if (killed / "checkpoint.pt").is_file() else None
        if state is not None and state["step"] >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(killed)["step"]
    assert interrupted_at < 6, "the run finished before it could be killed; make its steps slower"
    proc = _cli(args + ["--output-dir", str(killed), "--resume"])
    assert proc.wait(timeout=600) == 0, proc.stdout.read()

    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), name
    assert [r["step"] for r in _records(killed)] == list(range(1, 7))
    drop = ("time_generate", "time_teacher", "time_loss", "time_optim")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    assert strip(_records(killed)) == strip(_records(straight))
