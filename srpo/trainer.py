"""One SRPO training run: rollouts, verifiable rewards, routing, the self-teacher on distilled rows only, the fused
loss from backbone hidden states and the lm_head weight (never ``model(...).logits``), AdamW, EMA, metrics."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import srpo_kernels
from . import checkpoint, models
from .routing import ALGOS, route_group
from .tasks import Arithmetic, JsonlDataset, get_verifier
from .teacher import EMATeacher, chat_prompt_ids, teacher_prompt_ids


@dataclass
class TrainConfig:
    """Every option of ``srpo train`` (the CLI's --help is generated from these fields and their comments)."""

    model: str = "smollm2"  # "smollm2" (embedded SmolLM2-135M-Instruct), "tiny" (random Qwen3), or a local HF dir
    algo: str = "srpo"  # srpo | grpo | sdpo
    task: str = "arithmetic"  # "arithmetic" or a JSONL file of {"prompt", "answer"[, "feedback"]}
    verifier: str = "numeric"  # for JSONL tasks: numeric | mcq | toolcall | module:function
    digits: int = 1  # arithmetic: operand digits
    ops: str = "+-"  # arithmetic: operators drawn from +, -, *
    steps: int = 5  # optimiser steps
    prompts_per_step: int = 4  # prompts sampled per step
    group_size: int = 4  # rollouts per prompt
    max_new_tokens: int = 32  # response length cap
    temperature: float = 1.0  # sampling and loss temperature
    lr: float = 2e-6  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up
    max_grad_norm: float = 1.0  # gradient-norm clip
    teacher: str = "ema"  # ema (EMA of the policy) | live (the policy itself, no grad)
    ema_rate: float = 0.05  # EMA rate of the teacher
    alpha: float = 0.5  # divergence: 0 forward KL, 1 reverse KL, in between generalised JSD
    topk: Optional[int] = None  # distil over the student's top-K ids (None: full vocabulary)
    topk_tail: bool = True  # with topk: one tail bucket (else renormalised top-K)
    entropy_beta: float = 1.0  # teacher-entropy weight exp(-beta H_T); 0 disables
    is_clip: float = 2.0  # cap of the SDPO importance weight
    eps_low: float = 0.2  # GRPO clip range below 1
    eps_high: float = 0.28  # GRPO clip range above 1
    dual_clip: Optional[float] = 3.0  # GRPO dual clip for negative advantages (None disables)
    std_normalize: bool = False  # divide advantages by the group std
    micro_batch: int = 0  # rollouts per micro-batch (0: all at once); one global token normaliser per step
    eval_every: int = 0  # greedy evaluation every N steps (0: only at the end)
    eval_prompts: int = 8  # held-out prompts per evaluation
    save_every: int = 1  # checkpoint every N steps
    output_dir: str = "runs/srpo"  # metrics.jsonl, checkpoint.pt, plots
    resume: bool = False  # continue from output_dir/checkpoint.pt
    seed: int = 0  # seeds the model (tiny), sampling and tasks
    backend: str = "auto"  # srpo_kernels backend
    progress: bool = True  # progress bar

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.teacher not in ("ema", "live"):
            raise ValueError(f"teacher must be 'ema' or 'live', got {self.teacher!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_prompts", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2 and self.algo != "grpo":
            raise ValueError("group_size must be >= 2: routing needs siblings")


@dataclass
class Rollouts:
    prompts: List[List[int]]  # per rollout
    responses: List[List[int]]
    texts: List[str]
    examples: list  # per rollout


@dataclass
class StepResult:
    metrics: dict
    loss_inputs: dict = field(default_factory=dict)  # last micro-batch's fused-loss inputs (for checks)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = models.load(cfg.model, cfg.seed)
        self.model.train()
        if cfg.task == "arithmetic":
            self.task = Arithmetic(cfg.digits, cfg.ops, seed=cfg.seed)
            self.eval_task = Arithmetic(cfg.digits, cfg.ops, seed=cfg.seed + 10_007)
            self.verify = get_verifier("numeric")
        else:
            self.task = JsonlDataset(cfg.task, cfg.verifier, seed=cfg.seed)
            self.eval_task = JsonlDataset(cfg.task, cfg.verifier, seed=cfg.seed + 10_007)
            self.verify = get_verifier(cfg.verifier)
        self.eval_examples = self.eval_task.sample(cfg.eval_prompts)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = EMATeacher(self.model, cfg.ema_rate) if cfg.teacher == "ema" and cfg.algo != "grpo" else None
        self.step = 0
        self.history: List[dict] = []
        self.verifier_errors = 0
        if cfg.resume:
            self._restore()

    # ------------------------------------------------------------------ checkpoints
    def _restore(self):
        state = checkpoint.load(self.out)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
        checkpoint.set_rng_state(state["rng"])
        self.task.set_state(state["task_rng"])
        self.step, self.history = state["step"], state["history"]
        self.verifier_errors = state.get("verifier_errors", 0)
        self._write_metrics()  # drop records written after the checkpoint

    def save(self):
        checkpoint.save(self.out, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": None if self.ema is None else self.ema.model.state_dict(),
            "rng": checkpoint.rng_state(), "task_rng": self.task.state(), "step": self.step,
            "history": self.history, "verifier_errors": self.verifier_errors, "config": dataclasses.asdict(self.cfg)})

    def _write_metrics(self):
        with open(self.out / "metrics.jsonl", "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ rollouts and rewards
    @torch.no_grad()
    def generate(self, examples, n: int, greedy: bool = False) -> Rollouts:
        tok, cfg = self.tokenizer, self.cfg
        prompts = [chat_prompt_ids(tok, ex.prompt) for ex in examples]
        width = max(map(len, prompts))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        self.model.eval()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                  do_sample=not greedy, temperature=cfg.temperature if not greedy else None,
                                  top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                                  num_return_sequences=n, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        self.model.train()
        responses, texts, per_prompts, per_examples = [], [], [], []
        for row, seq in enumerate(out[:, width:].tolist()):
            if tok.eos_token_id in seq:
                seq = seq[:seq.index(tok.eos_token_id) + 1]  # keep the EOS: ending is part of the answer
            else:
                seq = [t for t in seq if t != pad] if pad != tok.eos_token_id else seq
            responses.append(seq)
            texts.append(tok.decode(seq, skip_special_tokens=True))
            per_prompts.append(prompts[row // n])
            per_examples.append(examples[row // n])
        return Rollouts(per_prompts, responses, texts, per_examples)

    def reward(self, text: str, answer) -> float:
        try:
            r = float(self.verify(text, answer))
            if not 0.0 <= r <= 1.0 or math.isnan(r):
                raise ValueError(f"reward {r} outside [0, 1]")
            return r
        except Exception as exc:  # a broken verifier must not stop training: reward 0, counted and logged
            self.verifier_errors += 1
            if self.verifier_errors <= 5:
                print(f"[srpo] verifier error ({type(exc).__name__}: {exc}); reward 0")
            return 0.0

    # ------------------------------------------------------------------ hidden states
    def _response_hidden(self, model, prompts, responses):
        """Backbone hidden states at the positions that predict each response token, flattened in rollout order."""
        pad = self.tokenizer.pad_token_id
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(r)) + i * width
                          for i, (p, r) in enumerate(zip(prompts, responses))])
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples = self.task.sample(cfg.prompts_per_step)
        roll = self.generate(examples, cfg.group_size)
        t_gen = time.perf_counter() - t0

        rewards = torch.tensor([self.reward(t, ex.answer) for t, ex in zip(roll.texts, roll.examples)])
        g = cfg.group_size
        adv, distill, in_loss, teacher_inputs = [], [], [], {}
        for k in range(cfg.prompts_per_step):
            routing = route_group(rewards[k * g:(k + 1) * g], cfg.algo, cfg.std_normalize)
            adv += routing.advantages.tolist()
            distill += routing.distill.tolist()
            in_loss += routing.in_loss.tolist()
            for j, sib in enumerate(routing.sibling):
                if sib is not None:
                    i = k * g + j
                    teacher_inputs[i] = teacher_prompt_ids(self.tokenizer, roll.examples[i].prompt,
                                                           roll.texts[k * g + sib])
        rows = [i for i in range(len(roll.responses)) if in_loss[i] and roll.responses[i]]
        sd_rows = [i for i in rows if distill[i]]

        # Teacher forward only for the distilled rollouts (this is SRPO's compute saving over SDPO).
        t1 = time.perf_counter()
        teacher_model = self.ema.model if self.ema is not None else self.model
        with torch.no_grad():
            teacher_hidden = (self._response_hidden(teacher_model, [teacher_inputs[i] for i in sd_rows],
                                                    [roll.responses[i] for i in sd_rows]) if sd_rows else None)
        t_teacher = time.perf_counter() - t1 if sd_rows else 0.0  # no teacher rows: no teacher phase at all

        t2 = time.perf_counter()
        lm_head = self.model.get_output_embeddings()
        n_tokens = sum(len(roll.responses[i]) for i in rows)
        micro = cfg.micro_batch or max(len(rows), 1)
        weight_normalizer = None
        if teacher_hidden is not None and len(rows) > micro and cfg.entropy_beta > 0 and cfg.topk is None:
            # One entropy-weight normaliser for the whole step (full-vocabulary teacher entropies).
            ids = torch.tensor([t for i in sd_rows for t in roll.responses[i]])
            _, h_t = srpo_kernels.fused_logprobs(teacher_hidden, lm_head.weight.detach(), ids,
                                                 temperature=cfg.temperature, with_entropy=True,
                                                 backend=cfg.backend)
            weight_normalizer = float(torch.exp(-cfg.entropy_beta * h_t).mean())
        sd_offset = 0
        totals = {"loss": 0.0, "div": 0.0, "w": 0.0, "clip": 0.0, "sd_tok": 0, "g_tok": 0}
        loss_inputs = {}
        for start in range(0, len(rows), micro):
            mb = rows[start:start + micro]
            hidden = self._response_hidden(self.model, [roll.prompts[i] for i in mb],
                                           [roll.responses[i] for i in mb])
            token_ids = torch.tensor([t for i in mb for t in roll.responses[i]])
            lens = [len(roll.responses[i]) for i in mb]
            route = torch.tensor([distill[i] for i in mb]).repeat_interleave(torch.tensor(lens))
            advantages = torch.tensor([adv[i] for i in mb]).repeat_interleave(torch.tensor(lens))
            n_sd = int(route.sum())
            th = teacher_hidden[sd_offset:sd_offset + n_sd] if n_sd else None
            sd_offset += n_sd
            loss_inputs = dict(hidden=hidden.detach(), weight=lm_head.weight.detach(), token_ids=token_ids,
                               advantages=advantages, route=route, teacher_hidden=th,
                               bias=None if lm_head.bias is None else lm_head.bias.detach(),
                               options=dict(temperature=cfg.temperature, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                            dual_clip=cfg.dual_clip, alpha=cfg.alpha, topk=cfg.topk,
                                            topk_tail=cfg.topk_tail, is_clip=cfg.is_clip,
                                            entropy_beta=cfg.entropy_beta, normalizer=n_tokens,
                                            weight_normalizer=weight_normalizer))
            out = srpo_kernels.fused_srpo_loss(hidden, lm_head.weight, token_ids, advantages, route, th,
                                               bias=lm_head.bias, backend=cfg.backend, **loss_inputs["options"])
            out.loss.backward()
            totals["loss"] += float(out.loss.detach())
            m = out.metrics
            sd_tok, g_tok = n_sd, len(token_ids) - n_sd
            totals["div"] += m["divergence_mean"] * sd_tok
            totals["w"] += m["distill_weight_mean"] * sd_tok
            totals["clip"] += m["clip_fraction"] * g_tok
            totals["sd_tok"] += sd_tok
            totals["g_tok"] += g_tok
            loss_inputs["loss"] = float(out.loss.detach())
        t_loss = time.perf_counter() - t2

        t3 = time.perf_counter()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)) if rows else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        t_optim = time.perf_counter() - t3

        self.step += 1
        correct = rewards >= 0.5
        sd_tok, g_tok = totals["sd_tok"], totals["g_tok"]
        rec = {
            "step": self.step, "algo": cfg.algo, "loss": totals["loss"],
            "reward_mean": float(rewards.mean()), "accuracy": float(correct.float().mean()),
            "rollouts": len(roll.responses), "sdpo_rollouts": int(sum(distill)),
            "grpo_rollouts": int(sum(1 for i in range(len(distill)) if in_loss[i] and not distill[i])),
            "teacher_rows": len(sd_rows), "distill_weight_mean": totals["w"] / sd_tok if sd_tok else 0.0,
            "kl": totals["div"] / sd_tok if sd_tok else 0.0, "clip_fraction": totals["clip"] / g_tok if g_tok else 0.0,
            "response_len": sum(map(len, roll.responses)) / len(roll.responses), "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0], "verifier_errors": self.verifier_errors,
            "time_generate": t_gen, "time_teacher": t_teacher, "time_loss": t_loss, "time_optim": t_optim,
        }
        return StepResult(rec, loss_inputs)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Greedy accuracy on the held-out prompts (does not touch the training RNG)."""
        with torch.random.fork_rng():
            roll = self.generate(self.eval_examples, 1, greedy=True)
        return sum(self.reward(t, ex.answer) >= 0.5 for t, ex in zip(roll.texts, roll.examples)) / len(roll.texts)

    def train(self) -> List[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algo} on {cfg.model}", disable=not cfg.progress,
                   unit="step")
        while self.step < cfg.steps:
            result = self.train_step()
            rec = result.metrics
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                rec["eval_accuracy"] = self.evaluate()
            self.history.append(rec)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", sdpo=rec["sdpo_rollouts"])
            bar.write(f"step {rec['step']}: reward {rec['reward_mean']:.3f} acc {rec['accuracy']:.3f} "
                      f"sdpo {rec['sdpo_rollouts']} teacher_rows {rec['teacher_rows']} loss {rec['loss']:+.4f} "
                      f"time gen/teacher/loss/optim {rec['time_generate']:.1f}/{rec['time_teacher']:.1f}/"
                      f"{rec['time_loss']:.1f}/{rec['time_optim']:.1f}s")
        bar.close()
        return self.history
