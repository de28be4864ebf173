"""TRL drop-in on the tiny model: the fused GRPO loss equals TRL's own for each loss type (value and lm_head
gradient, same batch), and SRPOTrainer runs two steps with the teacher only on distilled rows."""
import pytest
import torch

pytest.importorskip("trl", reason="TRL not installed (pip install 'srpo-kernels[trl]')")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from coin_verifier import coin  # noqa: E402
from conftest import tiny_granite  # noqa: E402
from processes import spawn_within  # noqa: E402
from srpo.integrations.trl import EMA_CHECKPOINT, FusedGRPOTrainer, SRPOConfig, SRPOTrainer  # noqa: E402
from srpo.models import tiny_model, tiny_tokenizer  # noqa: E402
from srpo.teacher import teacher_user_turn  # noqa: E402


def _reward(completions, **_):
    return [coin(c if isinstance(c, str) else c[0]["content"], None) for c in completions]


def _dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"Say something {i}"}]} for i in range(8)])


def _trainer(cls, tmp_path, model=None, reward=_reward, data=None, peft_config=None, **config):
    """A `cls` (FusedGRPOTrainer or SRPOTrainer) on `model` (default: the tiny one, seed 1), `data` (default:
    _dataset()) and _args's config updated with `config`."""
    tok = tiny_tokenizer()
    return cls(model=tiny_model(tok, seed=1) if model is None else model, reward_funcs=reward, processing_class=tok,
               train_dataset=_dataset() if data is None else data, peft_config=peft_config,
               args=_args(SRPOConfig if cls is SRPOTrainer else GRPOConfig, tmp_path, **config))


def _args(cls, tmp_path, **over):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, use_bias_correction_kl=False, num_generations=4,
              max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
              save_strategy="no", beta=0.0, seed=0)
    kw.update(over)
    return cls(**kw)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_fused_grpo_loss_equals_trl(tmp_path, loss_type, off_policy):
    _assert_fused_loss_equals_trl(tmp_path, tiny_model(tiny_tokenizer(), seed=1), loss_type, off_policy)


def test_fused_loss_of_a_model_that_scales_its_logits_equals_trl(tmp_path):
    """Granite divides its logits by logits_scaling, which TRL's log-probs apply: the fused loss, from lm_head(h),
    gave 0.0646 against TRL's 0.0460 before its temperature took the scale in (models.logit_scale)."""
    _assert_fused_loss_equals_trl(tmp_path, tiny_granite(tiny_tokenizer()), "bnpo", off_policy=True)


def test_a_model_that_soft_caps_its_logits_is_refused_at_construction(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_tokenizer()
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Gemma2ForCausalLM(config)
    with pytest.raises(ValueError, match="soft-caps its logits"):
        _trainer(FusedGRPOTrainer, tmp_path, model)


def test_fused_loss_with_trls_fp32_lm_head_equals_trl(tmp_path):
    """cast_lm_head_to_fp32 (ScaleRL's recipe): TRL gives a bf16 model an fp32 lm_head and computes the logits in fp32
    from fp32 hidden states. The fused loss refused the two dtypes ("weight must have hidden's dtype")."""
    model = tiny_model(tiny_tokenizer(), seed=1).to(torch.bfloat16)
    _assert_fused_loss_equals_trl(tmp_path, model, "bnpo", off_policy=True, cast_lm_head_to_fp32=True)
    assert model.lm_head.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.bfloat16


def test_fp32_lm_head_on_tied_embeddings_has_no_ema_teacher(tmp_path):
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32 with tied word embeddings .* teacher='live'"):
        _trainer(SRPOTrainer, tmp_path, tiny_model(tiny_tokenizer(), seed=1).to(torch.bfloat16),
                 cast_lm_head_to_fp32=True)


def _untie(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _assert_fused_loss_equals_trl(tmp_path, model, loss_type, off_policy, **config):
    """The fused loss against TRL's (to the 2e-3 of its log-probs) and against TRL's loss code fed exact log-probs
    (value and every gradient to 1e-5)."""
    trainer = _trainer(FusedGRPOTrainer, tmp_path, model, loss_type=loss_type, epsilon_high=0.28, **config)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(list(_dataset()))
    if off_policy:
        trainer.beta = 0.05  # set after generation: the batch brings its own reference log-probs (no ref model)
    g = torch.Generator().manual_seed(2)
    if off_policy:  # ratios away from 1 (the clip matters) and a KL-to-reference term
        shape = batch["completion_ids"].shape
        batch["old_per_token_logps"] = -4.0 + 0.5 * torch.randn(shape, generator=g)
        batch["ref_per_token_logps"] = -4.0 + 0.5 * torch.randn(shape, generator=g)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    trainer.current_gradient_accumulation_steps = 1
    model.train()

    def run(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_loss, fused_grads = run(lambda: trainer._compute_loss(model, batch))
    trl_loss, _ = run(lambda: GRPOTrainer._compute_loss(trainer, model, batch))
    # TRL 1.16 scores log-probs with its own chunked LM head, measured here up to 2.2e-3 (mean 6e-4) away from an
    # exact fp32 log-softmax; ratios and hence off-policy losses inherit that. On-policy the value is exact.
    assert torch.allclose(fused_loss, trl_loss, rtol=5e-3 if off_policy else 1e-5, atol=1e-7), (fused_loss, trl_loss)
    # Exactness: TRL's loss code fed log-probs from materialised logits (plain autograd), value and gradients.
    trainer._get_per_token_logps_and_entropies = _materialised_logps(trainer)
    plain_loss, plain_grads = run(lambda: GRPOTrainer._compute_loss(trainer, model, batch))
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5, atol=1e-7), (fused_loss, plain_loss)
    for name, grad in plain_grads.items():
        err = (fused_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert err < 1e-5, (name, float(err))


def _materialised_logps(trainer):
    def logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=logits_to_keep + 1).logits[:, :-1].float() / trainer.temperature
        log_p = logits.log_softmax(-1)
        lp = log_p.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1) if compute_entropy else None
        return lp, entropy, None
    return logps


@pytest.mark.parametrize("dtype,fp32_head", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_srpo_trainer_runs_two_steps(tmp_path, dtype, fp32_head):
    """bf16: a model loaded in bf16 (TRL's usual) got an fp32 EMA teacher whose first update raised a dtype error.
    With cast_lm_head_to_fp32 (untied, as TRL documents it), the teacher's bf16 hidden states meet an fp32 lm_head."""
    model = tiny_model(tiny_tokenizer(), seed=1)
    if fp32_head:
        _untie(model)
    model = model.to(dtype)
    trainer = _trainer(SRPOTrainer, tmp_path, model, loss_type="bnpo", cast_lm_head_to_fp32=fp32_head)
    before = [p.clone() for p in trainer.ema.model.parameters()]
    result = trainer.train()
    assert result.global_step == 2
    logged = trainer.state.log_history
    assert any("fused/sdpo_fraction" in rec for rec in logged), logged
    assert any(rec.get("srpo/teacher_rows", 0) > 0 for rec in logged), logged  # mixed groups were distilled
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.ema.model.parameters()))  # EMA moved
    assert all(t.dtype == p.dtype for t, p in zip(trainer.ema.model.parameters(), model.parameters()))


@pytest.mark.parametrize("case", ["conversation", "plain-text", "evaluation"])
def test_teacher_prompt_is_the_students_with_the_solution_in_its_user_turn(tmp_path, case):
    """The teacher sees the student's prompt as TRL renders it (system prompt and earlier turns, chat template),
    its last user turn re-written as SPEC §1's, with the solution of a sibling of the same prompt; a plain-text
    prompt stays plain text, as the student's. It used to get a lone user turn, chat-templated (no system prompt; a
    template the plain-text student never saw), and evaluation, which draws num_generations_eval per prompt, was
    grouped by the training count: siblings of another prompt."""
    tok = tiny_tokenizer()
    system = {"role": "system", "content": "Answer in one word."}
    group = 2 if case == "evaluation" else 4
    texts = [f"Say hi {k}" for k in range(8 // group)]
    data = Dataset.from_list([{"prompt": [system, {"role": "user", "content": t}] if case != "plain-text" else t}
                              for t in texts for _ in range(group)])

    def alternate(completions, **_):  # every group holds failed rollouts with a correct sibling
        return [float(i % 2) for i in range(len(completions))]
    trainer = _trainer(SRPOTrainer, tmp_path, reward=alternate, data=data, loss_type="bnpo", num_generations_eval=2)
    if case == "evaluation":
        trainer.model.eval()
    batch = trainer._generate_and_score_completions(list(data))
    rows = batch["srpo_route"].nonzero().flatten().tolist()
    assert rows == list(range(0, 8, 2))
    completions = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    for i in rows:
        turn = teacher_user_turn(texts[i // group], completions[i - i % group + 1])  # its group's first correct
        want = (turn if case == "plain-text" else
                f"<|system|>{system['content']}<|end|><|user|>{turn}<|end|><|assistant|>")
        ids = batch["teacher_prompt_ids"][i][batch["teacher_prompt_mask"][i].bool()]
        assert tok.decode(ids) == want


def test_unscorable_rollouts_are_not_distilled(tmp_path):
    """TRL 1.16 gives a rollout that every reward function scored None advantage 0 (no learning signal).
    SRPOTrainer counted it a failure (nansum's 0) and distilled it toward a correct sibling."""

    def partly_unscorable(completions, **_):
        return [None, 1.0, 0.0, 1.0] * (len(completions) // 4)
    trainer = _trainer(SRPOTrainer, tmp_path, reward=partly_unscorable, loss_type="bnpo")
    batch = trainer._generate_and_score_completions(list(_dataset()))
    assert batch["srpo_route"].tolist() == [False, False, True, False] * 2
    assert batch["advantages"][::4].abs().max() == 0


def test_a_lora_adapter_on_the_lm_head_is_refused(tmp_path):
    """The loss takes the lm_head's weight: an adapter on the lm_head would be left out of its logits and get no
    gradient (its B starts at 0, so check_head cannot see it). TRL >= 1.16 refuses it for its own fused head.
    modules_to_save's full copy is what the loss takes, and is accepted."""
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")
    model = tiny_model(tiny_tokenizer(), seed=1)
    _untie(model)
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        _trainer(FusedGRPOTrainer, tmp_path, model, peft_config=peft.LoraConfig(r=4, target_modules=["lm_head"]))
    model = tiny_model(tiny_tokenizer(), seed=1)
    _untie(model)
    _trainer(FusedGRPOTrainer, tmp_path, model,
             peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def test_lora_model_through_both_trainers(tmp_path):
    """A PEFT (LoRA) model, TRL's usual way to train big models: the drop-in took PEFT's tuner for the backbone (the
    hidden-state hook never fired) and SRPOTrainer could not copy it for the EMA teacher. The fused loss equals
    TRL's loss code on exact log-probs, LoRA gradients included, and the teacher follows the LoRA weights alone."""
    peft = pytest.importorskip("peft", reason="peft not installed (pip install peft)")

    def lora():
        return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    fused = _trainer(FusedGRPOTrainer, tmp_path, peft_config=lora(), loss_type="bnpo")
    torch.manual_seed(0)
    batch = fused._generate_and_score_completions(list(_dataset()))
    fused.current_gradient_accumulation_steps = 1
    model = fused.model
    model.train()

    def run(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = run(lambda: fused._compute_loss(model, batch))
    fused._get_per_token_logps_and_entropies = _materialised_logps(fused)
    plain_loss, plain_grads = run(lambda: GRPOTrainer._compute_loss(fused, model, batch))
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert fused_grads.keys() == plain_grads.keys() and all("lora" in n for n in fused_grads)
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-12), name

    srpo = _trainer(SRPOTrainer, tmp_path, peft_config=lora(), loss_type="bnpo")
    before = {n: p.clone() for n, p in srpo.ema.model.named_parameters()}
    srpo.train()
    assert any(rec.get("srpo/teacher_rows", 0) > 0 for rec in srpo.state.log_history)
    moved = {n for n, p in srpo.ema.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora" in n for n in moved)


def test_ema_teacher_is_refused_on_sharded_parameters():
    """Under ZeRO-3 or FSDP the EMA teacher would copy shards: a size-mismatch error deep in load_state_dict, or a
    shard-by-whole lerp at the first update. The error says what to use instead."""
    from types import SimpleNamespace

    from srpo.integrations.trl import _check_unsharded

    def trainer(zero_stage=None, fsdp=False):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
                               is_fsdp_enabled=fsdp, model=torch.nn.Linear(2, 2))
    _check_unsharded(trainer())
    _check_unsharded(trainer(zero_stage=2))
    for sharded, name in ((trainer(zero_stage=3), "DeepSpeed ZeRO-3"), (trainer(fsdp=True), "FSDP")):
        with pytest.raises(ValueError, match=f"not supported under {name}: .*use teacher='live'"):
            _check_unsharded(sharded)


def test_srpo_trainer_resumes_its_ema_teacher(tmp_path):
    """Resumed from a checkpoint, the run continues the uninterrupted one exactly: TRL's checkpoint lacked the EMA
    teacher, which restarted from the initial model (policy and teacher then drifted off, ~1e-4 in 2 steps)."""
    def trainer():
        return _trainer(SRPOTrainer, tmp_path, loss_type="bnpo", max_steps=4, save_strategy="steps", save_steps=2,
                        ema_rate=0.5)
    whole = trainer()
    whole.train()
    checkpoint = tmp_path / "checkpoint-2"
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(list(whole.model.parameters()) + list(whole.ema.model.parameters()),
                    list(resumed.model.parameters()) + list(resumed.ema.model.parameters())):
        assert torch.equal(a, b)
    (checkpoint / EMA_CHECKPOINT).unlink()  # e.g. a FusedGRPOTrainer's checkpoint: said, not silent
    with pytest.warns(UserWarning, match="holds no EMA teacher"):
        trainer().train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("cls", [FusedGRPOTrainer, SRPOTrainer])
def test_tool_results_stay_out_of_the_loss(tmp_path, cls):
    """TRL marks tool and environment results in a completion with tool_mask 0 and leaves them out of its loss;
    SRPOTrainer used to train on them (only padding and routing masked its loss)."""
    trainer = _trainer(cls, tmp_path, loss_type="bnpo")
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(list(_dataset()))
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    trainer.current_gradient_accumulation_steps = 1
    tool = torch.ones_like(batch["completion_mask"])
    tool[:, 1:3] = 0
    trainer._compute_loss(trainer.model, dict(batch, tool_mask=tool))
    in_loss = batch["srpo_in_loss"][:, None] if cls is SRPOTrainer else True
    expected = batch["completion_mask"].bool() & tool.bool() & in_loss
    assert expected.sum() < (batch["completion_mask"].bool() & in_loss).sum()  # the tool mask takes some out
    assert trainer._metrics["train"]["fused/valid_tokens"][-1] == float(expected.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_srpo_trainer_reduces_its_loss_as_trl_does_for_the_loss_type(tmp_path, monkeypatch, loss_type):
    """SRPOTrainer took every batch's mean over its tokens (bnpo), whatever loss_type said (TRL defaults to dapo)."""
    import srpo.integrations.trl as drop_in

    trainer = _trainer(SRPOTrainer, tmp_path, loss_type=loss_type)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(list(_dataset()))
    batch["num_items_in_batch"] = 3 * batch["completion_mask"].sum()  # as if the generation batch were larger
    trainer.current_gradient_accumulation_steps = 1
    per_token = []
    fused = drop_in.srpo_kernels.fused_srpo_loss
    monkeypatch.setattr(drop_in.srpo_kernels, "fused_srpo_loss",
                        lambda *a, **k: per_token.append(fused(*a, **k)) or per_token[-1])
    loss = trainer._compute_loss(trainer.model, batch)
    token_loss = per_token[-1].loss.detach()
    mask = (batch["completion_mask"].bool() & batch["srpo_in_loss"][:, None]).float()
    expected = drop_in.aggregate(trainer, token_loss, mask, batch)
    bnpo = (token_loss * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected, rtol=1e-6) and not torch.allclose(expected, bnpo, rtol=1e-3)


@pytest.mark.parametrize("cls", [FusedGRPOTrainer, SRPOTrainer])
@pytest.mark.parametrize("option,value", [("entropy_coef", 0.01), ("delta", 2.0), ("router_aux_loss_coef", None),
                                          ("vision-language", None)])
def test_loss_options_the_fused_loss_lacks_are_refused_by_both_trainers(tmp_path, cls, option, value):
    trainer = _trainer(cls, tmp_path, **({} if value is None else {option: value}))
    if option == "router_aux_loss_coef":
        trainer.aux_loss_enabled = True  # what TRL sets for an MoE model (the tiny model has no router)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(list(_dataset()))
    if option == "vision-language":
        trainer._is_vlm = True  # what TRL sets for a model with a processor; its batches then carry pixel_values
    with pytest.raises(ValueError, match=option):
        trainer._compute_loss(trainer.model, batch)


@pytest.mark.parametrize("option,value", [("algo", "ppo"), ("teacher", "frozen"), ("ema_rate", 0.0), ("alpha", 1.5),
                                          ("topk", 0), ("entropy_beta", -1.0), ("is_clip", 0.0), ("dual_clip", 0.5)])
def test_srpo_config_refuses_bad_options_at_construction(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        _args(SRPOConfig, tmp_path, **{option: value})


# ---------------------------------------------------------------- FSDP2: two gloo processes on the CPU
def _fsdp_problem(own_head):
    """The tiny model (untied when the lm_head gets its own fully_shard: FSDP2 needs tied weights in one group)
    and a batch, the same in every process."""
    from transformers import Qwen3ForCausalLM

    tok = tiny_tokenizer()
    config = tiny_model(tok, seed=3).config
    config.tie_word_embeddings = not own_head
    torch.manual_seed(3)
    model = Qwen3ForCausalLM(config)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, config.vocab_size, (4, 9), generator=g)
    return model, ids, torch.randn(4, 1, generator=g)


def _fused_loss(model):
    """The drop-in's loss path: hidden states through the model's own forward, the lm_head from
    gathered_lm_head. Returns the loss and the type of lm_head.weight that the loss found."""
    from types import SimpleNamespace

    from srpo.integrations.trl import backbone_hidden, gathered_lm_head
    import srpo_kernels

    _, ids, adv = _fsdp_problem(False)
    hidden = backbone_hidden(model, ids[:, :-1], torch.ones_like(ids[:, :-1]))
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(state=SimpleNamespace()))
    found = type(model.lm_head.weight).__name__
    with gathered_lm_head(trainer) as (weight, bias):
        return srpo_kernels.fused_srpo_loss(hidden, weight, ids[:, 1:], adv, bias=bias, backend="torch").loss, found


def _fsdp_worker(rank, world, init_file, out_file, own_head):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, _, _ = _fsdp_problem(own_head)
    for layer in model.model.layers:
        fully_shard(layer)
    if own_head:
        fully_shard(model.lm_head)
    fully_shard(model)
    loss, sharded = _fused_loss(model)
    loss.backward()  # every rank holds the same batch: the averaged gradient is the batch's
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save((grads, sharded), out_file)
    # Both ranks leave together: a rank that tore gloo down while rank 0 was still saving aborted once in CI
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("own_head", [False, True], ids=["tied-root-head", "own-fully-shard-head"])
def test_fused_loss_under_fsdp2_reaches_the_shards(tmp_path, own_head):
    """Under torch's FSDP2 (fully_shard, 2 gloo processes), the drop-in's loss path gives every parameter's shard
    the single-process gradient: a tied lm_head that the root keeps unsharded, and an lm_head under its own
    fully_shard, which is a DTensor again by the time the loss reads it."""
    out_file = tmp_path / "grads.pt"
    spawn_within(300, _fsdp_worker, args=(2, str(tmp_path / "init"), str(out_file), own_head), nprocs=2)
    grads, sharded = torch.load(out_file)
    assert sharded == ("DTensor" if own_head else "Parameter")
    model, _, _ = _fsdp_problem(own_head)
    _fused_loss(model)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _live_teacher_worker(rank, world, init_file, tmp):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trainer = _trainer(SRPOTrainer, f"{tmp}/rank{rank}", teacher="live")
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(list(_dataset()))
    assert bool(batch["srpo_route"].any())  # mixed groups: distilled rows
    if rank == 1:
        batch["srpo_route"][:] = False  # this rank's groups all right or all wrong
    for layer in trainer.model.model.layers:
        fully_shard(layer)
    fully_shard(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # TRL's training loop sets it
    trainer._compute_loss(trainer.model, batch).backward()
    dist.barrier()
    dist.destroy_process_group()


def test_live_teacher_under_fsdp2_runs_on_a_rank_with_no_distilled_row(tmp_path):
    """Every forward of an FSDP2 (or ZeRO-3) model gathers parameters with the other ranks: a rank with no
    distilled row skipped the teacher's forward, and the ranks that had some waited for it forever."""
    spawn_within(300, _live_teacher_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)


def _zero3_worker(rank, world, port, out_file):
    import os
    from types import SimpleNamespace

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from srpo.integrations.trl import backbone_hidden, gathered_lm_head
    import srpo_kernels

    deepspeed.init_distributed(dist_backend="gloo")
    model, ids, adv = _fsdp_problem(False)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
    sharded = engine.module.lm_head.weight.numel()  # 0: ZeRO-3 partitioned it away
    hidden = backbone_hidden(engine, ids[:, :-1], torch.ones_like(ids[:, :-1]))
    trainer = SimpleNamespace(model=engine, accelerator=SimpleNamespace(state=SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=3))))
    with gathered_lm_head(trainer) as (weight, bias):
        loss = srpo_kernels.fused_srpo_loss(hidden, weight, ids[:, 1:], adv, bias=bias, backend="torch").loss
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save((grads, sharded), out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_fused_loss_under_deepspeed_zero3_reaches_the_shards(tmp_path):
    """DeepSpeed ZeRO-3 on the CPU (2 gloo processes): the drop-in gathers the partitioned lm_head for the loss, and
    every parameter's gradient equals the single-process one."""
    pytest.importorskip("deepspeed", reason="DeepSpeed not installed (optional: pip install deepspeed; ZeRO-3 runs on "
                                            "the CPU with gloo)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = tmp_path / "grads.pt"
    spawn_within(300, _zero3_worker, args=(2, port, str(out_file)), nprocs=2)
    grads, sharded = torch.load(out_file)
    assert sharded == 0
    model, _, _ = _fsdp_problem(False)
    _fused_loss(model)[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
