"""One SRPO training run: rollouts, verifiable rewards, routing, the self-teacher on distilled rows only, the fused
loss from backbone hidden states and the lm_head weight (never ``model(...).logits``), AdamW, EMA, metrics."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import srpo_kernels
from srpo_kernels.backends import BACKENDS, get_row_ops
from . import checkpoint, models
from .peak_memory import PeakMemory
from .routing import check_algo, route_rollouts
from .tasks import JsonlDataset, load_task
from .teacher import EMATeacher, chat_prompt_ids, check_teacher, teacher_prompt_ids

LOSSES = ("fused", "reference")
# Options a resumed run may change: how long, where, on what, and how it reports and evaluates; the same
# computation otherwise (the loss implementations and micro-batching agree to rounding).
RESUMABLE_CHANGES = ("steps", "resume", "output_dir", "progress", "eval_every", "eval_prompts", "eval_samples",
                     "save_every", "device", "backend", "loss", "micro_batch")


@dataclass
class TrainConfig:
    """Every option of ``srpo train`` (the CLI's --help is generated from these fields and their comments)."""

    model: str = "smollm2"  # smollm2 (embedded SmolLM2-135M-Instruct), tiny (random Qwen3), tiny-qwen3-vocab (with Qwen3's 151936-row lm_head), or a local HF dir
    algo: str = "srpo"  # srpo | grpo | sdpo
    task: str = "arithmetic"  # arithmetic, parity (a reward with no skill behind it, for measuring compute), reasoning-gym:NAME (extra [tasks]), or a JSONL file of {"prompt", "answer"}
    verifier: str = "numeric"  # for JSONL tasks: numeric | mcq | toolcall | math-verify (extra [tasks]) | module:function
    digits: int = 1  # arithmetic: operand digits
    ops: str = "+-"  # arithmetic: operators drawn from +, -, *
    steps: int = 5  # optimiser steps
    prompts_per_step: int = 4  # prompts sampled per step
    group_size: int = 4  # rollouts per prompt
    max_new_tokens: int = 32  # response length cap
    temperature: float = 1.0  # sampling and loss temperature
    lr: Optional[float] = None  # AdamW learning rate (default: 1e-3 for the random tiny models, 1e-5 otherwise)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up
    max_grad_norm: Optional[float] = 1.0  # gradient-norm clip (None: no clip, the norm still logged)
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
    micro_batch: int = 0  # rollouts per forward/backward (0: a whole mini-batch at once)
    mini_batches: int = 1  # optimiser updates per epoch, each on 1/K of the step's rollouts (verl's ppo_mini_batch)
    epochs: int = 1  # passes over the step's rollouts (verl's ppo_epochs); more than one update uses old log-probs
    eval_every: int = 0  # evaluate every N steps (0: at step 0 and at the end only)
    eval_prompts: int = 16  # held-out prompts per evaluation
    eval_samples: int = 4  # sampled answers per held-out prompt, at the training temperature (0: one greedy answer)
    save_every: int = 1  # checkpoint every N steps
    output_dir: str = "runs/srpo"  # metrics.jsonl, checkpoint.pt, plots
    resume: bool = False  # continue from output_dir/checkpoint.pt
    seed: int = 0  # seeds the model (tiny), sampling and tasks
    backend: str = "auto"  # srpo_kernels backend
    loss: str = "fused"  # fused (srpo_kernels, no [N, V] logits) | reference (materialised logits, as TRL and SDPO)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (bf16 autocast forwards and loss; fp32 master weights and optimiser)
    progress: bool = True  # progress bar

    def __post_init__(self):
        check_algo(self.algo)
        check_teacher(self.teacher)
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_prompts", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2 and self.algo != "grpo":
            raise ValueError("group_size must be >= 2: routing needs siblings")
        if self.lr is None:  # a random tiny model learns nothing at a pretrained model's rate
            self.lr = 1e-3 if self.model.startswith("tiny") else 1e-5
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}")
        for name in ("mini_batches", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rollouts = self.prompts_per_step * self.group_size
        if self.mini_batches > rollouts:  # the parts beyond the rollouts would be empty: fewer updates than asked
            raise ValueError(f"mini_batches must be <= the rollouts per step (prompts_per_step x group_size = "
                             f"{rollouts}), got {self.mini_batches}")
        for name in ("warmup_steps", "micro_batch", "eval_every"):  # 0 has a meaning for each (see its comment)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not (0 < self.max_grad_norm < math.inf):
            # a clip to 0 zeroes every gradient: a run that silently learns nothing
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {self.max_grad_norm}")
        for name, allowed in (("loss", LOSSES), ("device", ("auto", "cpu", "cuda")), ("dtype", ("fp32", "bf16")),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.lr < math.inf:  # inf or NaN turns every weight NaN at the first update (0 freezes them)
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        # The loss options are checked now, not at the first loss call: that waits for a mini-batch with rows that
        # change the gradient, which a random or weak model may take many steps to sample.
        srpo_kernels.SRPOLossConfig(**self.loss_options())

    def loss_options(self) -> dict:
        """The options of srpo_kernels' loss that this run sets (the rest keep their defaults)."""
        return dict(temperature=self.temperature, eps_low=self.eps_low, eps_high=self.eps_high,
                    dual_clip=self.dual_clip, alpha=self.alpha, topk=self.topk, topk_tail=self.topk_tail,
                    is_clip=self.is_clip, entropy_beta=self.entropy_beta)

    @property
    def updates_per_step(self) -> int:
        return self.mini_batches * self.epochs


@dataclass
class Rollouts:
    prompts: List[List[int]]  # per rollout
    responses: List[List[int]]
    texts: List[str]
    examples: list  # per rollout


@dataclass
class Batch:
    """One step's rollouts, rewarded and routed (the output of the collect phase)."""

    roll: Rollouts
    rewards: torch.Tensor
    advantages: List[float]
    distill: List[bool]
    in_loss: List[bool]
    teacher_prompts: Dict[int, List[int]]  # distilled rollout -> the teacher's prompt (with a correct sibling)

    def loss_rows(self) -> List[int]:
        """Rollouts whose tokens count in the loss (and its token normaliser)."""
        return [i for i, r in enumerate(self.roll.responses) if self.in_loss[i] and r]

    def changes_gradient(self, i: int) -> bool:
        """A rollout neither distilled nor with a non-zero advantage adds exactly 0 to the gradient (GRPO's surrogate
        is ratio * advantage, and the trainer has no KL-to-reference term), so it skips the student pass."""
        return self.distill[i] or self.advantages[i] != 0.0


@dataclass
class StepResult:
    metrics: dict
    student_rows: List[int] = field(default_factory=list)  # rollouts that went through the student pass
    batch: Optional[Batch] = None
    loss_inputs: dict = field(default_factory=dict)  # last micro-batch's loss inputs (for checks)


class PhaseTimer:
    """Wall time per named phase of a step (CUDA work is synchronised at each phase's end)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = models.load(cfg.model, cfg.seed, self.device)
        self.model.to(self.device).train()
        # Rollouts must be samples of softmax(z / T), the distribution the loss scores: generate() fills what it is
        # not told from the model's own generation_config (Qwen2.5-Instruct's repetition_penalty 1.05, top_p 0.8),
        # which made them off-policy without a word.
        from transformers import GenerationConfig

        # Where a response ends is no sampling setting: the config's EOS ids are kept (a Qwen2.5-Instruct rollout that
        # sampled <|endoftext|> ran on past it to max_new_tokens, and was verified and trained on as one response).
        self.stop_ids = models.stop_token_ids(self.model, self.tokenizer)
        self.model.generation_config = GenerationConfig()
        # Generation never samples the lm_head rows the tokenizer lacks, and the loss scores that distribution too,
        # with the same -inf bias (scored over every row, tiny-qwen3-vocab's 151 831 random extra rows held nearly all
        # the mass: log p of the sampled tokens was up to 7 below the sampler's).
        self.unsampled_rows = models.unsampled_rows(self.model, self.tokenizer, self.device)
        self.logits_processor = models.adding_bias(self.unsampled_rows)
        # The losses see lm_head(h) / T; the sampler sees the model's logits / T, which some models scale (Granite,
        # Cohere): the loss's temperature takes the scale in, so both score one distribution.
        scale = models.logit_scale(self.model)
        models.check_head(self.model, scale)
        self.loss_temperature = cfg.temperature / scale
        # An unavailable --backend (triton without CUDA, cpu without a compiler) is an error now, not at the first
        # loss call, which waits for rows that change the gradient (steps of generation, maybe many).
        try:
            get_row_ops(cfg.backend, self.device, self.amp_dtype or torch.float32,
                        self.model.get_output_embeddings().weight.shape[0])
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc
        self.task, self.eval_examples, self.verify = load_task(cfg.task, cfg.verifier, cfg.digits, cfg.ops, cfg.seed,
                                                               cfg.eval_prompts)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMATeacher(self.model, cfg.ema_rate) if cfg.teacher == "ema" and cfg.algo != "grpo" else None
        self.step = 0
        self.history: List[dict] = []
        self.verifier_errors = 0
        if cfg.resume:
            self._restore()
        if not self.history:
            # A fresh start: an earlier run's records in output_dir would otherwise stay at the head of metrics.jsonl,
            # this run's appended after them (two step 0s in one file).
            if (self.out / "metrics.jsonl").is_file() and (self.out / "metrics.jsonl").stat().st_size:
                print(f"[srpo] starting over in {self.out}: its earlier metrics.jsonl is replaced (--resume continues "
                      f"a run from its checkpoint)")
            self._write_metrics()

    # ------------------------------------------------------------------ checkpoints
    def _restore(self):
        state = checkpoint.load(self.out)
        if state is None:
            print(f"[srpo] --resume: no checkpoint in {self.out}, starting at step 0")
            return
        self._check_resumable(state.get("config") or {})
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        checkpoint.set_rng_state(state["rng"])
        self.task.set_state(state["task_rng"])
        self.step, self.history = state["step"], state["history"]
        self.verifier_errors = state.get("verifier_errors", 0)
        self._write_metrics()  # drop records written after the checkpoint

    def _check_resumable(self, saved: dict):
        """A resumed run continues the saved one: options that change what it computes must be the same."""
        now = dataclasses.asdict(self.cfg)
        free = set(RESUMABLE_CHANGES)
        if isinstance(self.task, JsonlDataset):
            free.discard("eval_prompts")  # a JSONL file's held-out lines: another count moves lines into training
        changed = [f"{k} {saved[k]!r} (now {now[k]!r})" for k in saved if k in now and k not in free
                   and saved[k] != now[k]]
        if changed:
            raise ValueError(f"--resume: the checkpoint in {self.out} was trained with other options: "
                             f"{', '.join(changed)}; pass the same ones, or start over in another --output-dir")

    def save(self):
        checkpoint.save(self.out, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": checkpoint.rng_state(), "task_rng": self.task.state(), "step": self.step,
            "history": self.history, "verifier_errors": self.verifier_errors, "config": dataclasses.asdict(self.cfg)})

    def _write_metrics(self):
        with open(self.out / "metrics.jsonl", "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    def _record(self, rec: dict):
        self.history.append(rec)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ rollouts and rewards
    @torch.no_grad()
    def generate(self, examples, n: int, greedy: bool = False) -> Rollouts:
        tok, cfg = self.tokenizer, self.cfg
        prompts = [chat_prompt_ids(tok, ex.prompt) for ex in examples]
        width = max(map(len, prompts))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        self.model.eval()
        with self._autocast():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                      do_sample=not greedy, temperature=cfg.temperature if not greedy else None,
                                      top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                                      num_return_sequences=n, pad_token_id=pad, eos_token_id=self.stop_ids or None,
                                      logits_processor=self.logits_processor)
        self.model.train()
        responses, texts, per_prompts, per_examples = [], [], [], []
        for row, seq in enumerate(out[:, width:].tolist()):
            # Only a row that ended (EOS, kept: ending is part of the answer) is padded after it; one that did not ran
            # to max_new_tokens and every token is a sample, the pad id too (dropping it scored another sequence).
            end = next((j for j, t in enumerate(seq) if t in self.stop_ids), None)
            if end is not None:
                seq = seq[:end + 1]
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

    def collect(self) -> Batch:
        """Generate a group per prompt, reward each rollout, route each group."""
        cfg = self.cfg
        examples = self.task.sample(cfg.prompts_per_step)
        roll = self.generate(examples, cfg.group_size)
        rewards = torch.tensor([self.reward(t, ex.answer) for t, ex in zip(roll.texts, roll.examples)])
        routed = route_rollouts(rewards, cfg.group_size, cfg.algo, cfg.std_normalize)
        teacher_prompts = {i: teacher_prompt_ids(self.tokenizer, roll.examples[i].prompt, roll.texts[sib])
                           for i, sib in enumerate(routed.sibling) if sib is not None}
        return Batch(roll, rewards, routed.advantages, routed.distill, routed.in_loss, teacher_prompts)

    # ------------------------------------------------------------------ hidden states
    def _response_hidden(self, model, prompts, responses):
        """Backbone hidden states at the positions that predict each response token, flattened in rollout order."""
        pad = self.tokenizer.pad_token_id
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
        with self._autocast():  # a training forward: no generation cache to build
            hidden = models.backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(r)) + i * width
                          for i, (p, r) in enumerate(zip(prompts, responses))]).to(self.device)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

    def _per_row(self, rows, responses, flat):
        """Split a flat ``[tokens, ...]`` tensor of `rows` (in order) into one tensor per rollout."""
        return dict(zip(rows, flat.split([len(responses[i]) for i in rows])))

    def _micro_batches(self, rows):
        size = self.cfg.micro_batch or max(len(rows), 1)
        return [rows[s:s + size] for s in range(0, len(rows), size)]

    def _lm_head(self):
        """(weight, bias) of the lm_head in the loss dtype (bf16 casts are differentiable: fp32 masters); the bias is
        -inf on the rows generation never samples (unsampled_rows)."""
        head = self.model.get_output_embeddings()
        dt = self.amp_dtype or head.weight.dtype
        bias = None if head.bias is None else head.bias.to(dt)
        if self.unsampled_rows is not None:
            bias = self.unsampled_rows.to(dt) if bias is None else bias + self.unsampled_rows.to(dt)
        return head.weight.to(dt), bias

    @torch.no_grad()
    def teacher_hidden(self, batch: Batch, rows: List[int]) -> Dict[int, torch.Tensor]:
        """The teacher's hidden states of the distilled rollouts, computed once per step (SRPO's saving over SDPO:
        no teacher pass for any other rollout)."""
        teacher = self.ema.model if self.ema is not None else self.model
        out = {}
        for mb in self._micro_batches(rows):
            flat = self._response_hidden(teacher, [batch.teacher_prompts[i] for i in mb],
                                         [batch.roll.responses[i] for i in mb])
            out.update(self._per_row(mb, batch.roll.responses, flat))
        return out

    def _token_ids(self, rows, responses) -> torch.Tensor:
        """The sampled tokens of `rows`, flattened in rollout order (as _response_hidden flattens their states)."""
        return torch.tensor([t for i in rows for t in responses[i]], device=self.device)

    def _fused_logprobs(self, hidden, head, rows, responses, with_entropy=False):
        """fused_logprobs of the sampled tokens of `rows` from their hidden states; `head` is _lm_head()."""
        weight, bias = head
        return srpo_kernels.fused_logprobs(hidden.to(weight.dtype), weight, self._token_ids(rows, responses),
                                           bias=bias, temperature=self.loss_temperature, with_entropy=with_entropy,
                                           backend=self.cfg.backend)

    @torch.no_grad()
    def old_logprobs(self, batch: Batch, rows: List[int]) -> Dict[int, torch.Tensor]:
        """Log-probs of the sampled tokens under the policy before this step's first update (the PPO ratio's
        denominator), from the fused log-probs without a gradient."""
        out, head = {}, self._lm_head()
        for mb in self._micro_batches(rows):
            hidden = self._response_hidden(self.model, [batch.roll.prompts[i] for i in mb],
                                           [batch.roll.responses[i] for i in mb])
            logp = self._fused_logprobs(hidden, head, mb, batch.roll.responses)
            out.update(self._per_row(mb, batch.roll.responses, logp.float()))
        return out

    @torch.no_grad()
    def weight_normalizer(self, teacher: Dict[int, torch.Tensor], rows: List[int], responses, prompts=None) -> float:
        """Mean of exp(-entropy_beta * H_T) over the distilled tokens of `rows`, H_T the teacher's entropy over the
        divergence's support as the loss computes it (the lm_head's bias included): the full vocabulary, or with
        `topk` the student's top-K (and tail), which takes a student pass without gradient over `prompts`."""
        cfg = self.cfg
        if cfg.topk is None:
            _, h_t = self._fused_logprobs(torch.cat([teacher[i] for i in rows]), self._lm_head(), rows, responses,
                                          with_entropy=True)
        else:
            weight, bias = self._lm_head()
            parts = []
            for mb in self._micro_batches(rows):
                hidden = self._response_hidden(self.model, [prompts[i] for i in mb], [responses[i] for i in mb])
                ids = self._token_ids(mb, responses)
                out = srpo_kernels.fused_srpo_loss(
                    hidden.to(weight.dtype), weight, ids, 0.0, torch.ones_like(ids, dtype=torch.bool),
                    torch.cat([teacher[i] for i in mb]), bias=bias, temperature=self.loss_temperature, topk=cfg.topk,
                    topk_tail=cfg.topk_tail, backend=cfg.backend)
                parts.append(out.teacher_entropy)
            h_t = torch.cat(parts)
        return float(torch.exp(-cfg.entropy_beta * h_t.double()).mean())

    # ------------------------------------------------------------------ the update phase
    def lr(self) -> float:
        """This step's learning rate: linear warm-up over `warmup_steps` training steps, then constant (every
        optimiser step of a training step uses it)."""
        warm = self.cfg.warmup_steps
        return self.cfg.lr * (min(1.0, (self.step + 1) / warm) if warm > 0 else 1.0)

    def _loss(self, hidden, weight, bias, token_ids, advantages, route, teacher_hidden, old, options):
        dt = weight.dtype
        th = None if teacher_hidden is None else teacher_hidden.to(dt)
        if self.cfg.loss == "reference":
            return srpo_kernels.reference.srpo_loss(hidden.to(dt), weight, token_ids, advantages, route, th,
                                                    old_logprobs=old, bias=bias, **options)
        return srpo_kernels.fused_srpo_loss(hidden.to(dt), weight, token_ids, advantages, route, th,
                                            old_logprobs=old, bias=bias, backend=self.cfg.backend, **options)

    def _accumulate(self, batch: Batch, part: List[int], active: List[int], teacher, old, totals) -> dict:
        """Forward and backward of one mini-batch: `part` are its rollouts in the loss (they set the token
        normaliser), `active` those that can change the gradient (the only ones the student sees)."""
        cfg, responses = self.cfg, batch.roll.responses
        n_tokens = sum(len(responses[i]) for i in part)
        micro = self._micro_batches(active)
        sd_rows = [i for i in active if batch.distill[i]]
        weight_normalizer = None
        if len(micro) > 1 and sd_rows and cfg.entropy_beta > 0:
            # One entropy-weight normaliser for the mini-batch, not one per micro-batch (with top-K each had its own).
            weight_normalizer = self.weight_normalizer(teacher, sd_rows, responses, batch.roll.prompts)
        options = dict(cfg.loss_options(), temperature=self.loss_temperature, normalizer=n_tokens,
                       weight_normalizer=weight_normalizer)
        loss_inputs = {}
        weight, bias = self._lm_head()
        for mb in micro:
            hidden = self._response_hidden(self.model, [batch.roll.prompts[i] for i in mb],
                                           [responses[i] for i in mb])
            lens = torch.tensor([len(responses[i]) for i in mb], device=self.device)
            token_ids = self._token_ids(mb, responses)
            route = torch.tensor([batch.distill[i] for i in mb], device=self.device).repeat_interleave(lens)
            advantages = torch.tensor([batch.advantages[i] for i in mb], device=self.device).repeat_interleave(lens)
            sd = [i for i in mb if batch.distill[i]]
            th = torch.cat([teacher[i] for i in sd]) if sd else None
            old_lp = None if old is None else torch.cat([old[i] for i in mb])
            out = self._loss(hidden, weight, bias, token_ids, advantages, route, th, old_lp, options)
            out.loss.backward()
            m, n_sd = out.metrics, len(th) if th is not None else 0
            g_tok = len(token_ids) - n_sd
            totals["loss"] += float(out.loss.detach())
            totals["div"] += m["divergence_mean"] * n_sd
            totals["w"] += m["distill_weight_mean"] * n_sd
            totals["clip"] += m["clip_fraction"] * g_tok
            totals["sd_tok"] += n_sd
            totals["g_tok"] += g_tok
            loss_inputs = dict(hidden=hidden.detach(), weight=weight.detach(), token_ids=token_ids,
                               advantages=advantages, route=route, teacher_hidden=th, old_logprobs=old_lp,
                               bias=None if bias is None else bias.detach(), options=options,
                               loss=float(out.loss.detach()))
        return loss_inputs

    def update(self, batch: Batch, rows: List[int], active: set, teacher, old, timer: PhaseTimer):
        """`epochs` passes over the rollouts in `mini_batches` parts, one optimiser step per part."""
        cfg = self.cfg
        k = cfg.mini_batches
        parts = [rows[len(rows) * j // k:len(rows) * (j + 1) // k] for j in range(k)]
        totals = {"loss": 0.0, "div": 0.0, "w": 0.0, "clip": 0.0, "sd_tok": 0, "g_tok": 0, "grad_norm": 0.0,
                  "updates": 0}
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        loss_inputs = {}
        for _ in range(cfg.epochs):
            for part in parts:
                act = [i for i in part if i in active]
                if not act:
                    continue  # nothing here can change the gradient: no pass, no optimiser step
                with timer("loss"):
                    loss_inputs = self._accumulate(batch, part, act, teacher, old, totals)
                with timer("optim"):
                    clip = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
                    norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
                    if not math.isfinite(norm):
                        # Stepped, NaN would fill the weights, the next checkpoint, and end the run in generate()
                        # with "probability tensor contains inf, nan".
                        raise FloatingPointError(
                            f"step {self.step + 1}: the gradient norm is {norm} (the model's backward overflowed or "
                            f"diverged); stopped before the optimiser step, so the weights and checkpoints hold no NaN")
                    totals["grad_norm"] += norm
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:  # SPEC §1: after each optimiser step, not once per step
                        self.ema.update(self.model)
                totals["updates"] += 1
        return totals, loss_inputs

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        cfg = self.cfg
        timer = PhaseTimer(self.device)
        peak = PeakMemory(self.device)
        lr = self.lr()
        with timer("generate"):
            batch = self.collect()
        rows = batch.loss_rows()
        active = [i for i in rows if batch.changes_gradient(i)]
        sd_rows = [i for i in active if batch.distill[i]]
        teacher = {}
        if sd_rows:  # no teacher rows: no teacher phase at all
            with timer("teacher"):
                teacher = self.teacher_hidden(batch, sd_rows)
        old = None
        if cfg.updates_per_step > 1 and active:  # one update is on-policy: the ratio is exactly 1
            with timer("old_logprobs"):
                old = self.old_logprobs(batch, active)
        totals, loss_inputs = self.update(batch, rows, set(active), teacher, old, timer)

        self.step += 1
        rewards, distill, in_loss = batch.rewards, batch.distill, batch.in_loss
        n = len(batch.roll.responses)
        sd_tok, g_tok, updates = totals["sd_tok"], totals["g_tok"], totals["updates"]
        rec = {
            "step": self.step, "algo": cfg.algo, "loss": totals["loss"] / max(updates, 1),
            "reward_mean": float(rewards.mean()), "accuracy": float((rewards >= 0.5).float().mean()),
            "rollouts": n, "sdpo_rollouts": int(sum(distill)),
            "grpo_rollouts": int(sum(1 for i in range(n) if in_loss[i] and not distill[i])),
            "teacher_rows": len(sd_rows), "student_rows": len(active), "skipped_rollouts": len(rows) - len(active),
            "updates": updates, "distill_weight_mean": totals["w"] / sd_tok if sd_tok else 0.0,
            "kl": totals["div"] / sd_tok if sd_tok else 0.0, "clip_fraction": totals["clip"] / g_tok if g_tok else 0.0,
            "response_len": sum(map(len, batch.roll.responses)) / n,
            "grad_norm": totals["grad_norm"] / max(updates, 1), "lr": lr,
            "verifier_errors": self.verifier_errors, "peak_memory_mb": peak.megabytes(),
        }
        rec.update({f"time_{p}": timer.seconds.get(p, 0.0) for p in ("generate", "teacher", "old_logprobs", "loss",
                                                                     "optim")})
        return StepResult(rec, active, batch, loss_inputs)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Accuracy on the held-out prompts: one greedy answer each, or `eval_samples` sampled answers at the training
        temperature, the same draws at every evaluation (a fixed seed, apart from the training RNG)."""
        n = self.cfg.eval_samples
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 20_011)
            roll = self.generate(self.eval_examples, max(n, 1), greedy=n == 0)
        return sum(self.reward(t, ex.answer) >= 0.5 for t, ex in zip(roll.texts, roll.examples)) / len(roll.texts)

    def train(self) -> List[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        if self.step == 0 and not self.history:  # the baseline that every later evaluation is read against
            self._record({"step": 0, "eval_accuracy": self.evaluate()})
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algo} on {cfg.model}", disable=not cfg.progress,
                   unit="step")
        while self.step < cfg.steps:
            rec = self.train_step().metrics
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                rec["eval_accuracy"] = self.evaluate()
            self._record(rec)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.2f}", sdpo=rec["sdpo_rollouts"])
            bar.write(f"step {rec['step']}: reward {rec['reward_mean']:.3f} acc {rec['accuracy']:.3f} "
                      f"sdpo {rec['sdpo_rollouts']} teacher_rows {rec['teacher_rows']} student_rows "
                      f"{rec['student_rows']} skipped {rec['skipped_rollouts']} loss {rec['loss']:+.4f} time "
                      + "/".join(f"{rec['time_' + p]:.1f}" for p in ("generate", "teacher", "old_logprobs", "loss",
                                                                      "optim"))
                      + "s (generate/teacher/old_logprobs/loss/optim)")
        bar.close()
        return self.history
