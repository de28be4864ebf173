"""The trainer on the tiny model: routing records, teacher only on distilled rows, loss = reference loss,
verifier errors, and an exact resume after SIGKILL."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import srpo_kernels
from conftest import tiny_config, tiny_granite, tiny_qwen3_next
from srpo import Trainer
from srpo.checkpoint import load as load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trainer_on(directory, model, tokenizer, **over):
    """A Trainer on `model` and `tokenizer` saved as a local model directory (`--model DIR`), its run inside it."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Trainer(tiny_config(directory / "run", model=str(directory), **over))


def _records(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def _steps(history):
    return [r for r in history if r["step"] > 0]


def test_srpo_runs_teacher_only_on_distilled_rollouts(tmp_path, coin_dataset):
    records = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=3)).train()
    assert _records(tmp_path) == records
    assert set(records[0]) == {"step", "eval_accuracy"} and records[0]["step"] == 0  # the baseline evaluation
    hist = _steps(records)
    assert len(hist) == 3
    assert all(r["teacher_rows"] == r["sdpo_rollouts"] for r in hist)
    assert sum(r["sdpo_rollouts"] for r in hist) > 0  # the coin makes mixed groups
    assert all(r["sdpo_rollouts"] + r["grpo_rollouts"] == r["rollouts"] for r in hist)
    for key in ("step", "reward_mean", "accuracy", "distill_weight_mean", "kl", "clip_fraction", "response_len",
                "student_rows", "skipped_rollouts", "peak_memory_mb", "time_generate", "time_teacher",
                "time_old_logprobs", "time_loss", "time_optim"):
        assert key in hist[0]
    assert "eval_accuracy" in hist[-1]


def test_grpo_has_no_teacher(tmp_path, coin_dataset):
    hist = _steps(Trainer(tiny_config(tmp_path, algo="grpo", task=coin_dataset, verifier="coin_verifier:coin")).train())
    assert all(r["teacher_rows"] == 0 and r["time_teacher"] == 0 and r["sdpo_rollouts"] == 0 for r in hist)


def test_sdpo_has_no_grpo_term(tmp_path, coin_dataset):
    hist = _steps(Trainer(tiny_config(tmp_path, algo="sdpo", task=coin_dataset, verifier="coin_verifier:coin",
                                      steps=3)).train())
    assert all(r["grpo_rollouts"] == 0 and r["teacher_rows"] == r["sdpo_rollouts"] for r in hist)


@pytest.mark.parametrize("micro_batch,topk", [(0, None), (3, None), (3, 4)])
def test_trainer_loss_equals_reference_loss(tmp_path, coin_dataset, micro_batch, topk):
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=1,
                                  micro_batch=micro_batch, topk=topk))
    for _ in range(4):  # until a step has both branches
        x = trainer.train_step().loss_inputs
        if x.get("teacher_hidden") is not None and not bool(x["route"].all()):
            break
    assert x.get("teacher_hidden") is not None, "no mixed step in 4 tries"
    ref = srpo_kernels.reference.srpo_loss(x["hidden"].double(), x["weight"].double(), x["token_ids"],
                                           x["advantages"].double(), x["route"], x["teacher_hidden"].double(),
                                           bias=x["bias"], old_logprobs=x["old_logprobs"], **x["options"])
    assert abs(ref.loss.item() - x["loss"]) <= 1e-5 * max(1.0, abs(ref.loss.item()))


def _full_batch_reference_loss(trainer, batch, rows):
    """The reference loss over every rollout in the loss, skipped ones included, from the current model."""
    roll = batch.roll
    with torch.no_grad():
        hidden = trainer._response_hidden(trainer.model, [roll.prompts[i] for i in rows],
                                          [roll.responses[i] for i in rows])
        sd = [i for i in rows if batch.distill[i]]
        teacher = trainer.teacher_hidden(batch, sd)
    lens = torch.tensor([len(roll.responses[i]) for i in rows])
    head = trainer.model.get_output_embeddings()
    return srpo_kernels.reference.srpo_loss(
        hidden.double(), head.weight.detach().double(), torch.tensor([t for i in rows for t in roll.responses[i]]),
        torch.tensor([batch.advantages[i] for i in rows]).double().repeat_interleave(lens),
        torch.tensor([batch.distill[i] for i in rows]).repeat_interleave(lens),
        torch.cat([teacher[i] for i in sd]).double() if sd else None).loss.item()


def test_rollouts_that_cannot_change_the_gradient_skip_the_student_pass(tmp_path, coin_dataset):
    """Undistilled rollouts with advantage 0 (groups all right or all wrong) never reach the student's forward,
    and the step's loss still equals the reference loss over every rollout (lr 0: the model stays put)."""
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", lr=0.0,
                                  prompts_per_step=4, group_size=2))
    student_calls = []
    response_hidden = trainer._response_hidden

    def spy(model, prompts, responses):
        if model is trainer.model and torch.is_grad_enabled():
            student_calls.extend(map(id, responses))
        return response_hidden(model, prompts, responses)

    trainer._response_hidden = spy
    skipped_seen = 0
    for _ in range(6):
        student_calls.clear()
        result = trainer.train_step()
        batch, rec = result.batch, result.metrics
        rows = batch.loss_rows()
        skipped = [i for i in rows if not batch.distill[i] and batch.advantages[i] == 0]
        assert rec["skipped_rollouts"] == len(skipped) and rec["student_rows"] == len(rows) - len(skipped)
        assert not {id(batch.roll.responses[i]) for i in skipped} & set(student_calls)
        assert sorted(student_calls) == sorted(id(batch.roll.responses[i]) for i in result.student_rows)
        if rows:
            expected = _full_batch_reference_loss(trainer, batch, rows)
            assert abs(rec["loss"] - expected) <= 1e-5 * max(1.0, abs(expected))
        skipped_seen += len(skipped)
    assert skipped_seen, "no skipped rollout in 6 steps"


def test_mini_batches_and_epochs_clip_against_old_logprobs(tmp_path, coin_dataset):
    """Two mini-batches over two epochs: four optimiser steps per batch, ratios against the log-probs from before
    the first, so the clip acts (clip_fraction > 0 at some step)."""
    hist = _steps(Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=3,
                                      mini_batches=2, epochs=2, algo="grpo")).train())
    assert max(r["clip_fraction"] for r in hist) > 0
    assert all(r["updates"] <= 4 for r in hist) and max(r["updates"] for r in hist) == 4
    assert all(r["time_old_logprobs"] > 0 for r in hist if r["student_rows"])


def test_the_ema_teacher_follows_every_optimiser_step(tmp_path, coin_dataset):
    """SPEC §1: theta' <- (1 - rate) theta' + rate theta after each optimiser step. With two mini-batches over two
    epochs it moved once per step (and also at steps with no update at all)."""
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=3,
                                  mini_batches=2, epochs=2))
    calls = []
    update = trainer.ema.update
    trainer.ema.update = lambda model: calls.append(1) or update(model)
    hist = _steps(trainer.train())
    assert max(r["updates"] for r in hist) > 1 and len(calls) == sum(r["updates"] for r in hist)


def test_weight_normalizer_uses_the_lm_head_bias(tmp_path, coin_dataset):
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin"))
    head = trainer.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.weight.shape[0]) * 3)
    teacher = {0: torch.randn(5, head.weight.shape[1]), 1: torch.randn(3, head.weight.shape[1])}
    responses = [[1, 2, 3, 4, 5], [6, 7, 8]]
    logits = (torch.cat([teacher[0], teacher[1]]) @ head.weight.detach().T + head.bias.detach()).double()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    expected = torch.exp(-trainer.cfg.entropy_beta * entropy).mean().item()
    assert trainer.weight_normalizer(teacher, [0, 1], responses) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("topk_tail", [True, False])
def test_weight_normalizer_with_top_k_is_over_the_support(tmp_path, coin_dataset, topk_tail):
    """With --topk the loss takes H_T over the student's top-K (and tail): a micro-batched step used to skip the
    mini-batch normaliser and let each micro-batch normalise by its own mean. The normaliser it now passes is the
    mean over the loss's own teacher entropies, computed here in one call of the reference."""
    trainer = Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", topk=3,
                                  topk_tail=topk_tail, micro_batch=1, entropy_beta=2.0))
    h = trainer.model.get_output_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    prompts, responses = [[5, 6, 7], [8, 9], [10]], [[1, 2, 3, 4], [11, 12], [13, 14, 15]]
    teacher = {i: torch.randn(len(r), h, generator=g) for i, r in enumerate(responses)}
    rows = [0, 2]
    got = trainer.weight_normalizer(teacher, rows, responses, prompts)
    with torch.no_grad():
        hidden = trainer._response_hidden(trainer.model, [prompts[i] for i in rows], [responses[i] for i in rows])
    ids = torch.tensor([t for i in rows for t in responses[i]])
    head = trainer.model.get_output_embeddings()
    out = srpo_kernels.reference.srpo_loss(hidden.double(), head.weight.detach().double(), ids, 0.0,
                                           torch.ones(len(ids), dtype=torch.bool),
                                           torch.cat([teacher[i] for i in rows]).double(), topk=3,
                                           topk_tail=topk_tail, temperature=trainer.cfg.temperature)
    expected = torch.exp(-2.0 * out.teacher_entropy).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)
    full_vocab = srpo_kernels.reference.srpo_loss(hidden.double(), head.weight.detach().double(), ids, 0.0,
                                                  torch.ones(len(ids), dtype=torch.bool),
                                                  torch.cat([teacher[i] for i in rows]).double(),
                                                  temperature=trainer.cfg.temperature)
    assert abs(got - torch.exp(-2.0 * full_vocab.teacher_entropy).mean().item()) > 1e-3  # a different number


def test_bf16_step_runs_and_cuda_is_refused_without_a_gpu(tmp_path, coin_dataset):
    hist = _steps(Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin", steps=1,
                                      dtype="bf16")).train())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Trainer(tiny_config(tmp_path, device="cuda"))


@pytest.mark.parametrize("field,value", [("warmup_steps", -1), ("micro_batch", -2), ("eval_every", -1),
                                         ("max_grad_norm", 0.0), ("max_grad_norm", float("inf")),
                                         ("lr", float("inf")), ("lr", float("nan")), ("lr", -1e-3),
                                         ("weight_decay", -1.0), ("backend", "trition"),
                                         ("mini_batches", 9),  # 8 rollouts: one part would be empty, one update less
                                         # the loss's options: refused at construction, not at the first loss call
                                         # (which waits for rows that change the gradient: maybe many steps)
                                         ("alpha", 2.0), ("topk", 0), ("temperature", float("nan")),
                                         ("entropy_beta", -1.0), ("is_clip", 0.0), ("eps_low", 1.5)])
def test_config_refuses_values_with_no_meaning(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(tmp_path, **{field: value})


def test_unclipped_run_logs_the_gradient_norm(tmp_path, coin_dataset):
    hist = _steps(Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:coin",
                                      max_grad_norm=None)).train())
    updated = [r for r in hist if r["updates"]]
    assert updated and all(0 < r["grad_norm"] < float("inf") for r in updated)


def test_resume_refuses_changed_options_and_says_when_there_is_nothing(tmp_path, coin_dataset, capsys):
    opts = dict(task=coin_dataset, verifier="coin_verifier:coin", steps=1)
    Trainer(tiny_config(tmp_path / "none", resume=True, **opts))
    assert "no checkpoint" in capsys.readouterr().out
    Trainer(tiny_config(tmp_path, **opts)).train()
    with pytest.raises(ValueError, match=r"--resume: .*algo 'srpo' \(now 'grpo'\), alpha 0.5 \(now 1.0\)"):
        Trainer(tiny_config(tmp_path, resume=True, **dict(opts, algo="grpo"), alpha=1.0))
    assert Trainer(tiny_config(tmp_path, resume=True, **dict(opts, steps=3), micro_batch=2)).step == 1
    with pytest.raises(ValueError, match=r"--resume: .*eval_prompts 2 \(now 3\)"):  # JSONL: lines would move
        Trainer(tiny_config(tmp_path, resume=True, **opts, eval_prompts=3))
    # A truncated checkpoint (a full disk, a copy cut short) or another program's file: an error naming it. They
    # ended in a traceback from torch.load's zip reader, "invalid literal for int()", or a KeyError.
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    for content, error in ((saved[:1000], "is not a readable checkpoint"), (b"garbage\n", "is not a readable"),
                           (None, "is not a checkpoint of srpo train \\(it lacks model, optimizer")):
        if content is None:
            torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
        else:
            (tmp_path / "checkpoint.pt").write_bytes(content)
        with pytest.raises(ValueError, match=f"--resume: .*checkpoint.pt {error}"):
            Trainer(tiny_config(tmp_path, resume=True, **opts))


def test_a_fresh_run_in_an_earlier_runs_directory_starts_its_metrics_anew(tmp_path, coin_dataset, capsys):
    """Without --resume the second run's records were appended to the first's: metrics.jsonl held two step 0s."""
    opts = dict(task=coin_dataset, verifier="coin_verifier:coin", steps=1)
    Trainer(tiny_config(tmp_path, **opts)).train()
    capsys.readouterr()
    records = Trainer(tiny_config(tmp_path, **opts)).train()
    assert "starting over" in capsys.readouterr().out
    assert _records(tmp_path) == records and [r["step"] for r in records] == [0, 1]


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model must be smollm2, tiny, .*got '/no/such/model'"):
        Trainer(tiny_config(tmp_path, model="/no/such/model"))


def test_verifier_errors_give_zero_reward_and_training_goes_on(tmp_path, coin_dataset):
    hist = _steps(Trainer(tiny_config(tmp_path, task=coin_dataset, verifier="coin_verifier:broken")).train())
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
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert all(r["teacher_rows"] == r["sdpo_rollouts"] for r in _steps(recs))
    assert (tmp_path / "reward.png").is_file() and "teacher_rows" in out


def test_cli_compare_runs_fused_and_reference_side_by_side(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-m", "srpo", "compare", "--model", "tiny", "--no-progress", "--loss",
                           "both", "--steps", "1", "--prompts-per-step", "2", "--max-new-tokens", "6",
                           "--eval-prompts", "1", "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for algo in ("srpo", "sdpo", "grpo"):
        for loss in ("fused", "reference"):
            assert f"{algo}/{loss}" in proc.stdout
            assert _steps(_records(tmp_path / algo / loss))
    assert (tmp_path / "compare.png").is_file()


def test_cli_help_documents_every_option_and_its_default_once():
    from srpo import TrainConfig
    import dataclasses

    for command in ("train", "compare"):
        out = subprocess.run([sys.executable, "-m", "srpo", command, "--help"], cwd=ROOT,
                             capture_output=True, text=True, check=True, env=dict(os.environ, COLUMNS="200")).stdout
        options = re.split(r"\n  (?=--)", out.split("options:", 1)[1])[1:]
        for f in dataclasses.fields(TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            if command == "compare" and f.name in ("algo", "resume", "loss"):
                continue
            text = next((o for o in options if o.startswith(flag + " ") or o.startswith(flag + ",")
                         or o.startswith("--" + "[no-]" + flag[2:])), None)
            assert text is not None, (command, flag)
            assert " ".join(text.split()).count("(default:") == 1, (command, " ".join(text.split()))
            if f.name == "lr":  # None there is the model's rate, not "no learning rate"
                assert "'none' takes that default" in " ".join(text.split()), text


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
    for name, tensor in a["ema"]["model"].items():
        assert torch.equal(tensor, b["ema"]["model"][name]), name
    assert [r["step"] for r in _records(killed)] == list(range(0, 7))
    drop = ("time_generate", "time_teacher", "time_old_logprobs", "time_loss", "time_optim", "peak_memory_mb")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    assert strip(_records(killed)) == strip(_records(straight))


def test_cli_compare_over_seeds_summarises_learning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "srpo", "compare", "--model", "tiny", "--no-progress", "--seeds",
                           "0,1", "--steps", "2", "--eval-every", "1", "--prompts-per-step", "2",
                           "--max-new-tokens", "6", "--eval-prompts", "1", "--output-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for algo in ("srpo", "sdpo", "grpo"):
        for seed in (0, 1):
            assert [r["step"] for r in _records(tmp_path / algo / "fused" / f"seed{seed}") if "eval_accuracy" in r] \
                == [0, 1, 2]
    table = proc.stdout.split("Learning over seeds 0,1")[1]
    assert all(any(line.split()[:2] == [algo, "2"] for line in table.splitlines()) for algo in ("srpo", "grpo"))
    assert (tmp_path / "learning.png").is_file()


def test_cli_compare_rejects_bad_seeds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "srpo", "compare", "--seeds", "0,x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--seeds" in proc.stderr and "comma-separated integers" in proc.stderr


def test_cli_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    proc = _cli(["--steps", "1", "--output-dir", str(taken)])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out.strip().splitlines()[-1].startswith("srpo: error: ") and "Traceback" not in out


def test_trains_on_a_reasoning_gym_task(tmp_path):
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is the optional extra [tasks]")
    hist = _steps(Trainer(tiny_config(tmp_path, task="reasoning-gym:basic_arithmetic", steps=1)).train())
    assert hist[0]["rollouts"] == 8 and hist[0]["verifier_errors"] == 0


def test_rollouts_ignore_the_models_own_sampling_settings(tmp_path):
    """A model directory's generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05 and top_p 0.8) filled
    what generate() was not told: rollouts were not samples of softmax(z / T), the distribution the loss scores."""
    from srpo.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    samples = []
    for name, penalty in (("plain", None), ("tuned", 50.0)):
        model.generation_config.repetition_penalty = penalty
        model.generation_config.no_repeat_ngram_size = None if penalty is None else 1
        trainer = _trainer_on(tmp_path / name, model, tok, task="parity", max_new_tokens=12)
        torch.manual_seed(0)
        samples.append(trainer.generate(trainer.task.sample(2), 4).responses)
    assert samples[0] == samples[1]


def test_the_loss_scores_the_distribution_rollouts_are_sampled_from(tmp_path):
    """tiny-qwen3-vocab's lm_head has 151 936 rows for a tokenizer of 105: generation never samples the others
    (models.adding_bias), and the loss scored a softmax over all of them (log p up to 7.3 off the sampler's)."""
    _assert_scored_as_sampled(Trainer(tiny_config(tmp_path, model="tiny-qwen3-vocab", task="parity", max_new_tokens=4)))


def test_the_loss_scores_the_logits_of_a_model_that_scales_them(tmp_path):
    """Granite divides its logits by logits_scaling: the loss, which takes lm_head(h), scored logits 8x the
    sampler's (every log-prob off) until its temperature took the scale in (models.logit_scale)."""
    from srpo.models import tiny_tokenizer

    tok = tiny_tokenizer()
    trainer = _trainer_on(tmp_path / "granite", tiny_granite(tok), tok, task="parity", max_new_tokens=4,
                          temperature=0.7)
    assert trainer.loss_temperature == pytest.approx(0.7 * 8.0)
    _assert_scored_as_sampled(trainer)


def _assert_scored_as_sampled(trainer):
    """The fused log-probs of sampled responses are those of the distribution generate() sampled them from."""
    torch.manual_seed(0)
    roll = trainer.generate(trainer.task.sample(1), 2)
    rows = [i for i, r in enumerate(roll.responses) if r]
    with torch.no_grad():
        scored = trainer._fused_logprobs(trainer._response_hidden(trainer.model, [roll.prompts[i] for i in rows],
                                                                  [roll.responses[i] for i in rows]),
                                         trainer._lm_head(), rows, roll.responses)
        sampled = []
        for i in rows:
            ids = torch.tensor([roll.prompts[i] + roll.responses[i]])
            logits = trainer.model(ids).logits[0, len(roll.prompts[i]) - 1:-1] / trainer.cfg.temperature
            logits[:, len(trainer.tokenizer):] = -torch.inf  # what generate's logits processor does
            sampled.append(logits.log_softmax(-1).gather(1, torch.tensor(roll.responses[i])[:, None])[:, 0])
    torch.testing.assert_close(scored, torch.cat(sampled), rtol=0, atol=1e-5)


def test_a_sampled_pad_token_stays_in_its_response(tmp_path):
    """A row that ran to max_new_tokens had every pad id dropped: a pad token the model sampled mid-response (Qwen's
    <|endoftext|> is a pad id that is not its EOS) vanished, and the loss scored a sequence never sampled."""
    trainer = Trainer(tiny_config(tmp_path, task="parity", max_new_tokens=4))
    tok = trainer.tokenizer
    pad, eos, a, b = tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert pad != eos

    def generate(input_ids, num_return_sequences, **_):
        rows = [[a, pad, b, a], [a, eos, pad, pad]]  # ran to the limit; ended, then padded
        prompt = input_ids.repeat_interleave(num_return_sequences, 0)
        return torch.cat([prompt, torch.tensor(rows * (len(prompt) // 2))], 1)

    trainer.model.generate = generate
    roll = trainer.generate(trainer.task.sample(1), 2)
    assert roll.responses == [[a, pad, b, a], [a, eos]]


def test_a_response_ends_at_any_eos_of_the_models_generation_config(tmp_path):
    """The trainer replaces the model's generation_config (its sampling settings are not the loss's distribution) and
    stopped only at the tokenizer's EOS: a Qwen2.5-Instruct rollout that sampled <|endoftext|>, an EOS of its config,
    ran on to max_new_tokens and was verified and trained on whole."""
    from srpo.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    eos, end, a, b = tok.eos_token_id, tok.convert_tokens_to_ids("<|system|>"), tok.convert_tokens_to_ids("a"), \
        tok.convert_tokens_to_ids("b")
    model = tiny_model(tok)
    model.generation_config.eos_token_id = [eos, end]
    trainer = _trainer_on(tmp_path / "model", model, tok, task="parity", max_new_tokens=4)
    assert trainer.stop_ids == [eos, end]
    asked = {}

    def generate(input_ids, num_return_sequences, eos_token_id, **_):
        asked["eos"] = eos_token_id
        prompt = input_ids.repeat_interleave(num_return_sequences, 0)
        return torch.cat([prompt, torch.tensor([[a, end, b, a], [b, eos, end, a]] * (len(prompt) // 2))], 1)

    trainer.model.generate = generate
    roll = trainer.generate(trainer.task.sample(1), 2)
    assert asked["eos"] == [eos, end]
    assert roll.responses == [[a, end], [b, eos]]


def test_a_base_model_without_chat_template_trains_on_plain_text_prompts(tmp_path):
    """`--model DIR` of a base model: its tokenizer has no chat template, and the first rollout raised
    transformers' "Cannot use chat template functions"."""
    from srpo.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = None
    trainer = _trainer_on(tmp_path / "base", tiny_model(tok), tok, task="parity", steps=1)
    trainer.train()
    assert trainer.step == 1
    examples = trainer.task.sample(1)
    assert tok.decode(trainer.generate(examples, 1).prompts[0]) == examples[0].prompt


def test_a_hybrid_model_trains(tmp_path):
    """Qwen3-Next (linear and full attention layers, MoE): the trainer takes its hidden states, lm_head and head
    check as any other causal LM's."""
    from srpo.models import tiny_tokenizer

    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3NextForCausalLM"):
        pytest.skip("this transformers has no Qwen3NextForCausalLM")
    tok = tiny_tokenizer()
    trainer = _trainer_on(tmp_path / "hybrid", tiny_qwen3_next(tok), tok, task="parity", steps=1)
    trainer.train()
    assert trainer.step == 1


def test_a_non_finite_gradient_stops_before_the_optimiser_step(tmp_path):
    """Stepped, a NaN gradient filled the weights (and the checkpoint), and the next step died in generate() with
    "probability tensor contains either inf, nan or element < 0"."""
    trainer = Trainer(tiny_config(tmp_path, task="parity", max_grad_norm=None))
    layer = trainer.model.model.layers[0].mlp.down_proj.weight
    layer.register_hook(lambda grad: grad * torch.nan)
    before = layer.detach().clone()
    with pytest.raises(FloatingPointError, match=r"step \d: the gradient norm is nan .* stopped before the optimiser"):
        for _ in range(4):  # until a step has rows that change the gradient
            trainer.train_step()
    assert torch.equal(layer.detach(), before)


def test_an_unavailable_backend_is_refused_at_construction(tmp_path, monkeypatch):
    """It was refused at the first loss call, which waits for rows that change the gradient: steps of generation."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine without CUDA (the suite sets it for its tests)
    with pytest.raises(ValueError, match="backend='triton' is unavailable: it needs CUDA tensors"):
        Trainer(tiny_config(tmp_path, task="parity", backend="triton", device="cpu"))
