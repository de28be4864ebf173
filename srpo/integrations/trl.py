"""TRL drop-in: ``FusedGRPOTrainer`` (TRL's GRPO loss, computed without materialising logits) and ``SRPOTrainer``
(TRL's generation and rewards, SRPO routing, the self-teacher on distilled rows only, ``fused_srpo_loss``).

Requires ``pip install 'srpo-kernels[trl]'``. The loss reads the backbone's last hidden state (captured by a forward
hook while the wrapped model runs with ``logits_to_keep=1``, so DDP/accelerate wrappers still see the forward) and
the lm_head weight; under DeepSpeed ZeRO-3 the lm_head is gathered for the loss, as TRL's Liger path did, and under
FSDP2 a lm_head left sharded (a DTensor) is gathered by a differentiable all-gather whose backward lands on the shards.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

import srpo_kernels

from ..models import backbone, check_head, logit_scale
from ..routing import check_algo, route_rollouts
from ..teacher import EMATeacher, check_ema_rate, check_teacher, teacher_user_turn

FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
EMA_CHECKPOINT = "srpo_ema_teacher.pt"  # SRPOTrainer's EMA teacher, in each of TRL's checkpoint folders


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _causal_lm(model):
    """The Hugging Face causal LM under DDP/accelerate wrappers (``.module``) and a PEFT model (whose LoRA layers sit
    in the base model's modules): ``PeftModel.base_model`` is PEFT's tuner, whose output is the LM's logits."""
    model = _unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The decoder of the causal LM (models.backbone) under any of _causal_lm's wrappers."""
    return backbone(_causal_lm(model))


def backbone_hidden(model, input_ids, attention_mask):
    """Last hidden state ``[B, L, H]`` of the backbone, through the (possibly wrapped) model's own forward."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = _backbone(model).register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["hidden"]


def _full(param):
    """A DTensor parameter (FSDP2 shard) as the whole tensor, differentiably; anything else as it is.

    FSDP2 unshards the root's parameters for the forward and keeps them so until backward (a tied lm_head is one of
    them); an lm_head under its own ``fully_shard`` is resharded after its forward, so the loss finds a DTensor."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


def _zero3(trainer) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the trainer's parameters."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def gathered_lm_head(trainer):
    """The lm_head (weight, bias), gathered when DeepSpeed ZeRO-3 or FSDP2 shards it."""
    head = _unwrap(trainer.model).get_output_embeddings()
    params = [p for p in (head.weight, head.bias) if p is not None]
    if _zero3(trainer):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield head.weight, head.bias
    else:
        yield _full(head.weight), None if head.bias is None else _full(head.bias)


@contextlib.contextmanager
def head_precision(trainer, *states):
    """The hidden states as the lm_head takes them: under TRL's ``cast_lm_head_to_fp32`` (ScaleRL's fp32 head: an
    fp32 lm_head on a bf16 model) in fp32 and outside autocast, as TRL's head computes its logits; else as given."""
    if not getattr(trainer.args, "cast_lm_head_to_fp32", False):
        yield states
        return
    with torch.autocast(states[0].device.type, enabled=False):
        yield tuple(None if s is None else s.float() for s in states)


def _check_supported(trainer):
    args = trainer.args
    if trainer.loss_type not in FUSED_LOSS_TYPES:
        raise ValueError(f"fused loss supports loss_type in {FUSED_LOSS_TYPES}, got {trainer.loss_type!r}")
    unsupported = {"importance_sampling_level": args.importance_sampling_level != "token",
                   "delta": args.delta is not None, "top_entropy_quantile": trainer.top_entropy_quantile < 1.0,
                   "off_policy_mask_threshold": trainer.off_policy_mask_threshold is not None,
                   "use_bias_correction_kl (with beta != 0)": trainer.beta != 0 and bool(getattr(args, "use_bias_correction_kl", False)),
                   "use_vllm importance correction": trainer.use_vllm and trainer.vllm_importance_sampling_correction,
                   # TRL adds these to its loss; the fused one would leave them out without a word
                   "entropy_coef / use_adaptive_entropy (the entropy bonus)":
                       bool(getattr(trainer, "_entropy_bonus_enabled", False)),
                   "router_aux_loss_coef != 0 (an MoE model's router loss)": bool(getattr(trainer, "aux_loss_enabled",
                                                                                          False)),
                   # TRL passes pixel_values & co. to its forward; the hidden-state forward here would score the
                   # completions without their images
                   "a vision-language model (image inputs)": bool(getattr(trainer, "_is_vlm", False))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"the fused loss does not implement these GRPOConfig options: {bad}")


def aggregate(trainer, per_token_loss, mask, inputs):
    """TRL's own reduction of a ``[B, T]`` per-token loss for each loss_type (same normalisers)."""
    mode = "train" if trainer.model.training else "eval"
    accum = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer.loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
    if trainer.loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accum
    if trainer.loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * trainer.max_completion_length) / accum
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return (per_token_loss * mask).sum() / normalizer


def _completion_hidden(model, inputs, prompt_ids, prompt_mask, through_wrapper=True):
    """Hidden states at the positions that predict each completion token. The student goes through its (DDP)
    wrapper; the no-grad teacher calls its backbone directly, unless FSDP2 shards the model (its root forward
    gathers the root's parameters, the embedding among them)."""
    from torch.distributed.fsdp import FSDPModule

    completion_ids = inputs["completion_ids"]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, inputs["completion_mask"]], 1)
    if through_wrapper or isinstance(model, FSDPModule):
        hidden = backbone_hidden(model, ids, mask)
    else:
        hidden = _backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    width = prompt_ids.shape[1]
    return hidden[:, width - 1:width - 1 + completion_ids.shape[1]]  # the positions that predict each token


def _policy_tokens(inputs):
    """The completion tokens the policy wrote: TRL's loss mask, which leaves out tool and environment results
    (``tool_mask`` 0) as well as padding."""
    mask = inputs["completion_mask"]
    return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask


class FusedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is computed from hidden states with ``srpo_kernels`` (same value as TRL's for
    loss_type in grpo | bnpo | dr_grpo | dapo), never materialising ``[B, T, V]`` logits."""

    kernel_backend = "auto"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss takes lm_head(h) / T; TRL samples and scores the model's logits / T, which some models scale
        # (Granite, Cohere): the loss's temperature takes the scale in. A soft-capping model is refused here.
        lm = _causal_lm(self.model)
        scale = logit_scale(lm)
        if _sharding(self) is None:  # a sharded model's forward would gather with ranks that are not here yet
            check_head(lm, scale)
        self.loss_temperature = self.temperature / scale

    def _compute_loss(self, model, inputs):
        _check_supported(self)
        mask = _policy_tokens(inputs)
        hidden = _completion_hidden(model, inputs, inputs["prompt_ids"], inputs["prompt_mask"])
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        with gathered_lm_head(self) as (weight, bias), head_precision(self, hidden) as (hidden,):
            out = srpo_kernels.fused_srpo_loss(
                hidden, weight, inputs["completion_ids"], advantages, old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0 else None, ref_beta=self.beta,
                loss_mask=mask.bool(), bias=bias, temperature=self.loss_temperature, eps_low=self.epsilon_low,
                eps_high=self.epsilon_high, dual_clip=None, reduction="none", backend=self.kernel_backend)
        self._log_fused(out, mask)
        return aggregate(self, out.loss, mask, inputs)

    def _log_fused(self, out, mask):
        mode = "train" if self.model.training else "eval"
        for key, value in out.metrics.items():
            self._metrics[mode][f"fused/{key}"].append(value)


@dataclass
class SRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the SRPO options (SPEC §1)."""

    algo: str = field(default="srpo", metadata={"help": "srpo | sdpo | grpo"})
    alpha: float = field(default=0.5, metadata={"help": "divergence: 0 forward KL, 1 reverse KL, else JSD"})
    topk: Optional[int] = field(default=None, metadata={"help": "top-K support of the distillation (None: full)"})
    topk_tail: bool = field(default=True, metadata={"help": "with topk: one tail bucket"})
    entropy_beta: float = field(default=1.0, metadata={"help": "teacher-entropy weight exp(-beta H_T)"})
    is_clip: float = field(default=2.0, metadata={"help": "cap of the SDPO importance weight"})
    teacher: str = field(default="ema", metadata={"help": "ema | live"})
    ema_rate: float = field(default=0.05, metadata={"help": "EMA rate of the teacher"})
    dual_clip: Optional[float] = field(default=3.0, metadata={"help": "GRPO dual clip (None disables)"})

    def __post_init__(self):
        # Checked here, not at the first loss call, which comes after the first generation.
        super().__post_init__()
        check_algo(self.algo)
        check_teacher(self.teacher)
        check_ema_rate(self.ema_rate)
        srpo_kernels.SRPOLossConfig(alpha=self.alpha, topk=self.topk, topk_tail=self.topk_tail,
                                    entropy_beta=self.entropy_beta, is_clip=self.is_clip, dual_clip=self.dual_clip)


def _sharding(trainer) -> Optional[str]:
    """"DeepSpeed ZeRO-3" or "FSDP" when the trainer's parameters are sharded (every forward then gathers them with
    the other ranks), else None."""
    if _zero3(trainer):
        return "DeepSpeed ZeRO-3"
    return "FSDP" if getattr(trainer, "is_fsdp_enabled", False) or _has_dtensor(_unwrap(trainer.model)) else None


def _check_unsharded(trainer):
    """The EMA teacher is a whole copy of the policy, updated from its parameters: under FSDP or DeepSpeed ZeRO-3
    they are shards (a size-mismatch error at the copy, or a shard-by-whole lerp at the first update)."""
    sharded = _sharding(trainer)
    if sharded:
        raise ValueError(f"SRPOConfig(teacher='ema') is not supported under {sharded}: the EMA teacher would copy "
                         f"parameter shards; use teacher='live' (the policy under no_grad)")


def _has_dtensor(model) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # loaded by anything that made a DTensor
    return module is not None and any(isinstance(p, module.DTensor) for p in model.parameters())


class _EMACallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.update(_unwrap(self.trainer.model))


def _teacher_prompt(prompt, solution: str):
    """The student's prompt with its last user turn re-written as SPEC §1's teacher turn, in the student's format:
    a conversation keeps its system prompt and earlier turns (TRL then renders it with the student's chat template,
    tools and chat_template_kwargs), plain text stays plain text. The two contexts differ only by the solution."""
    if isinstance(prompt, str):
        return teacher_user_turn(prompt, solution)
    users = [i for i, m in enumerate(prompt) if m.get("role") == "user"]
    if not users:
        raise ValueError(f"SRPOTrainer: a conversational prompt needs a user turn to show the teacher the solution in, "
                         f"got roles {[m.get('role') for m in prompt]}")
    messages = [dict(m) for m in prompt]
    content = messages[users[-1]]["content"]
    if not isinstance(content, str):  # content blocks
        if any(part.get("type") != "text" for part in content):
            raise ValueError("SRPOTrainer: the teacher re-prompt takes text user turns; this one holds "
                             f"{sorted({part.get('type') for part in content})} parts")
        content = "".join(part["text"] for part in content)
    messages[users[-1]]["content"] = teacher_user_turn(content, solution)
    return messages


class SRPOTrainer(FusedGRPOTrainer):
    """TRL's generation and reward functions; SRPO routing; the teacher (EMA or live policy) re-prompted with a
    correct sibling's solution and run only for the distilled rows; ``fused_srpo_loss``, reduced as TRL reduces
    its loss for the config's loss_type (grpo | bnpo | dr_grpo | dapo)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(cfg, SRPOConfig):
            raise TypeError("SRPOTrainer needs args=SRPOConfig(...)")
        self.ema = None
        if cfg.teacher == "ema" and cfg.algo != "grpo":
            _check_unsharded(self)
            model = _unwrap(self.model)
            tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            if cfg.cast_lm_head_to_fp32 and tied:
                # TRL's fp32 head on tied embeddings keeps the decoder's inputs bf16 by a hook on the policy's
                # embedding, which the EMA copy (rebuilt from the config) lacks: its forward failed on a dtype error
                raise ValueError("cast_lm_head_to_fp32 with tied word embeddings (which TRL documents for untied "
                                 "models only) has no EMA teacher here: use teacher='live', or a model with an untied "
                                 "lm_head")
            self.ema = EMATeacher(model, cfg.ema_rate)
        self.add_callback(_EMACallback(self))

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, and the EMA teacher beside it: without it a resumed run's teacher restarted from the
        initial model (built before the checkpoint's weights were loaded)."""
        super()._save_checkpoint(model, trial)
        if self.ema is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.ema.state_dict(), os.path.join(folder, EMA_CHECKPOINT))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.ema is None:
            return
        path = os.path.join(resume_from_checkpoint, EMA_CHECKPOINT)
        if os.path.exists(path):
            self.ema.load_state_dict(torch.load(path, map_location=next(self.ema.model.parameters()).device))
        else:
            warnings.warn(f"{resume_from_checkpoint} holds no EMA teacher ({EMA_CHECKPOINT}): the teacher restarts "
                          f"from the resumed policy")
            self.ema = EMATeacher(_unwrap(self.model), self.args.ema_rate)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered over processes, in generation order
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        from accelerate.utils import gather_object

        out = super()._generate_and_score_completions(inputs)
        cfg, tok = self.args, self.processing_class
        weights = self.reward_weights.to(self._last_rewards_per_func.device)
        rewards = (self._last_rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[self._last_rewards_per_func.isnan().all(dim=1)] = torch.nan  # unscorable: TRL's advantage is 0
        rewards = rewards.cpu()
        completions = tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
        all_completions = gather_object(completions)
        local = len(completions)
        start = self.accelerator.process_index * local
        # Evaluation draws num_generations_eval per prompt: grouped by the training count, a failed rollout took a
        # "correct sibling" of another prompt.
        g = self.num_generations if self.model.training else self.num_generations_eval
        routed = route_rollouts(rewards, g, cfg.algo)
        mine = range(start, start + local)  # this process's rollouts
        distill = [routed.distill[i] for i in mine]
        in_loss = [routed.in_loss[i] for i in mine]
        siblings = [routed.sibling[i] for i in mine]
        # Tokenised by TRL itself, as it tokenised the student's prompts (rows that are not distilled keep theirs,
        # unused: the list stays aligned with the batch, which TRL's per-example tool schemas need).
        teacher_prompts = [x["prompt"] if s is None else _teacher_prompt(x["prompt"], all_completions[s])
                           for x, s in zip(inputs, siblings)]
        teacher_ids = [[] if s is None else list(ids)
                       for ids, s in zip(self._tokenize_prompts(teacher_prompts)[0], siblings)]
        width = max([len(t) for t in teacher_ids] + [1])
        pad = tok.pad_token_id
        device = out["completion_ids"].device
        out["srpo_route"] = torch.tensor(distill, device=device)
        out["srpo_in_loss"] = torch.tensor(in_loss, device=device)
        out["teacher_prompt_ids"] = torch.tensor([[pad] * (width - len(t)) + t for t in teacher_ids], device=device)
        out["teacher_prompt_mask"] = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in teacher_ids],
                                                  device=device)
        return out

    def _compute_loss(self, model, inputs):
        _check_supported(self)
        cfg = self.args
        mask = _policy_tokens(inputs).bool() & inputs["srpo_in_loss"][:, None]
        hidden = _completion_hidden(model, inputs, inputs["prompt_ids"], inputs["prompt_mask"])
        route_rows = inputs["srpo_route"]
        teacher_hidden, teacher_ran = None, 0.0
        distilled = bool(route_rows.any())
        # Every forward of a sharded model gathers parameters with the other ranks: a rank with no distilled row that
        # skipped the teacher left the ranks running theirs waiting for it. It runs one row, unused.
        if distilled or _sharding(self):
            teacher_rows = route_rows if distilled else torch.arange(len(route_rows), device=route_rows.device) == 0
            teacher = self.ema.model if self.ema is not None else model
            sub = {k: inputs[k][teacher_rows] for k in ("completion_ids", "completion_mask")}
            with torch.no_grad():
                teacher_hidden = _completion_hidden(teacher, sub, inputs["teacher_prompt_ids"][teacher_rows],
                                                    inputs["teacher_prompt_mask"][teacher_rows], through_wrapper=False)
            teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if distilled else None
            teacher_ran = float(teacher_rows.sum())
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages[:, None]
        route = route_rows[:, None].expand_as(mask)
        with gathered_lm_head(self) as (weight, bias), \
                head_precision(self, hidden, teacher_hidden) as (hidden, teacher_hidden):
            out = srpo_kernels.fused_srpo_loss(
                hidden, weight, inputs["completion_ids"], advantages, route, teacher_hidden,
                old_logprobs=inputs.get("old_per_token_logps"),
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0 else None, ref_beta=self.beta,
                loss_mask=mask, bias=bias, temperature=self.loss_temperature, eps_low=self.epsilon_low,
                eps_high=self.epsilon_high, dual_clip=cfg.dual_clip, alpha=cfg.alpha, topk=cfg.topk,
                topk_tail=cfg.topk_tail, is_clip=cfg.is_clip, entropy_beta=cfg.entropy_beta, reduction="none",
                backend=self.kernel_backend)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["srpo/sdpo_rollouts"].append(float(route_rows.sum()))
        self._metrics[mode]["srpo/teacher_rows"].append(teacher_ran)  # what the teacher ran, not what was routed
        self._log_fused(out, mask)
        return aggregate(self, out.loss, mask.to(out.loss.dtype), inputs)
