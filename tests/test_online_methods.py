"""The online methods (PPO, VinePPO, GRPO, RLOO) on the real tiny model: the loop, targets, frozen reference."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_reason.methods import GRPO, PPO, RLOO, VinePPO
from lit_reason.models.logprobs import response_logprobs
from helpers import force_eos

TASK = {"name": "arithmetic", "n_train": 64, "n_validation": 8, "n_test": 8}


def small(policy: str, **kw):
    base = dict(policy=policy, task=TASK, prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4,
                max_new_tokens=12, progress=False, rollout_batch_size=64)
    base.update(kw)
    return base


def fit(module, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return trainer


def online_recipe_classes() -> list[type]:
    """The OnlineRL classes the recipes use (from their class_path), so a new method is picked up."""
    import importlib
    from pathlib import Path

    import yaml

    from lit_reason.methods.dvpo import DVPO
    from lit_reason.methods.online import OnlineRL

    found = set()
    for recipe in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        config = yaml.safe_load(recipe.read_text())
        if "model" not in config:  # a fragment (recipes/fsdp.yaml), not a recipe
            continue
        module, _, name = config["model"]["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if issubclass(cls, OnlineRL) and cls is not DVPO:  # DVPO needs a GVM folder: tests/test_dvpo_methods.py
            found.add(cls)
    return sorted(found, key=lambda c: c.__name__)


SMALL_ARGS = {VinePPO: {"mc_rollouts": 2}}  # per-class settings that keep the run small


def test_online_recipes_are_found():
    assert {VinePPO, PPO, GRPO, RLOO} <= set(online_recipe_classes())


@pytest.mark.parametrize("cls", online_recipe_classes(), ids=lambda c: c.__name__)
def test_each_method_trains_and_keeps_reference_frozen(cls, tiny_policy_dir):
    torch.manual_seed(0)
    module = cls(**small(tiny_policy_dir, **SMALL_ARGS.get(cls, {})))
    handle = force_eos(module)
    examples = module.task.examples("train")[:2]
    traj = module.collect(examples)
    ref_before = module.reference.logprobs(traj.input_ids, traj.attention_mask, traj.prompt_len)
    pol_before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = fit(module, steps=2)
    handle.remove()
    assert trainer.global_step >= 2
    ref_after = module.reference.logprobs(traj.input_ids, traj.attention_mask, traj.prompt_len)
    torch.testing.assert_close(ref_before, ref_after)  # the reference never moves
    changed = any(not torch.equal(a, b) for a, b in zip(pol_before, module.policy.parameters()))
    assert changed, "the policy did not change after two optimiser steps"
    for p in module.reference.model.parameters():
        assert not p.requires_grad
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/pg_loss"])
    assert 0.0 <= float(metrics["train/finished"]) <= 1.0


def test_vineppo_advantages_follow_mc_values(tiny_policy_dir):
    module = VinePPO(**small(tiny_policy_dir, mc_rollouts=3, samples_per_prompt=3))
    handle = force_eos(module)
    traj = module.collect(module.task.examples("train")[:2])
    adv = module.compute_advantages(traj)
    handle.remove()
    values = traj.extras["step_values"]
    assert values.shape == traj.step_ends.shape
    # values are means of 3 binary rewards: multiples of 1/3 in [0, 1]
    assert ((values * 3 - (values * 3).round()).abs() < 1e-5).all()
    # S_0 (the prompt) is shared by all samples of a prompt: one estimate per prompt
    for g in traj.group_ids.unique():
        v0 = values[traj.group_ids == g, 0]
        assert torch.all(v0 == v0[0])
    assert adv.shape == traj.response_mask.shape
    assert (adv * (1 - traj.response_mask)).abs().sum() == 0
    # whitened over valid tokens: mean 0 (or all zero when every advantage was equal)
    valid = adv[traj.response_mask.bool()]
    assert abs(float(valid.mean())) < 1e-4


def test_vineppo_rejects_zero_rollouts():
    with pytest.raises(ValueError, match="mc_rollouts"):
        VinePPO(mc_rollouts=0)


@pytest.mark.parametrize("cls", [GRPO, RLOO])
def test_group_methods_need_two_samples(cls, tiny_policy_dir):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        cls(**small(tiny_policy_dir, samples_per_prompt=1))


def test_iteration_with_no_finished_response_is_a_logged_skip(tiny_policy_dir):
    # one new token: every response is cut (finish == "length"), so nothing can be learned
    module = GRPO(**small(tiny_policy_dir, max_new_tokens=1))
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_train_batches=3, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="no response finished"):
        trainer.fit(module)
    assert module.skipped_iterations == 3
    assert float(trainer.callback_metrics["train/skipped_iterations"]) == 3.0
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


def test_ppo_critic_state_values_read_last_token(tiny_policy_dir):
    module = PPO(**small(tiny_policy_dir))
    prompts = [[5, 6, 7], [8, 9]]
    partials = [[10], []]
    v = module.state_values(prompts, partials, [{}, {}])
    full = module.critic(torch.tensor([[5, 6, 7, 10]]), torch.ones(1, 4, dtype=torch.long))
    assert v.shape == (2,)
    torch.testing.assert_close(v[0], full[0, -1])
    # the critic is a separate copy: its trunk shares no storage with the policy
    pol = {p.data_ptr() for p in module.policy.parameters()}
    assert not pol & {p.data_ptr() for p in module.critic.parameters()}


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_policy_dir):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    module = GRPO(**small(tiny_policy_dir, lora=lora))
    assert module.reference.shares_policy and module.reference.model is module.policy  # no second copy
    traj = module.collect(module.task.examples("train")[:2])
    with module.policy.disable_adapter():
        base = response_logprobs(module.policy, traj.input_ids, traj.attention_mask, traj.prompt_len)
    ref = module.reference.logprobs(traj.input_ids, traj.attention_mask, traj.prompt_len)
    torch.testing.assert_close(ref, base)
    adapted = response_logprobs(module.policy, traj.input_ids, traj.attention_mask, traj.prompt_len)
    assert not torch.allclose(adapted, ref)  # random (non-zero) LoRA init changes the policy


def test_time_train_seconds_exclude_evaluation_time(tmp_path, tiny_policy_dir):
    import csv
    import time

    from lightning.pytorch.loggers import CSVLogger

    from lit_reason.callbacks import EvalAccuracy

    class TimedEval(EvalAccuracy):
        def evaluate(self, trainer, pl_module):
            started = time.perf_counter()
            acc = super().evaluate(trainer, pl_module)
            self.durations.append(time.perf_counter() - started)
            return acc

    evaluator = TimedEval(limit=4, every_n_steps=1, max_new_tokens=12)
    evaluator.durations = []
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path, name="csv"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[evaluator])
    module = GRPO(**small(tiny_policy_dir))
    force_eos(module)  # responses finish, so the first iteration already makes its 2 optimiser steps
    fit_started = time.perf_counter()
    trainer.fit(module)
    fit_seconds = time.perf_counter() - fit_started
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        seconds = [float(r["time/train_seconds"]) for r in csv.DictReader(f) if r.get("time/train_seconds")]
    # one iteration = 2 optimiser steps (2 epochs x 1 minibatch): evaluated at steps 0 and 2
    assert [step for step, _ in evaluator.history] == [0, 2]
    assert len(seconds) == len(evaluator.durations) == 2
    # before any training step no training time has passed (it used to report the evaluation's own time)
    assert seconds[0] < 0.1 * evaluator.durations[0]
    assert seconds == sorted(seconds)
    # at the end: at most the fit's wall-clock minus every evaluation
    assert seconds[-1] <= fit_seconds - sum(evaluator.durations) + 1e-3


def test_group_advantages_whiten_only_when_asked(tiny_policy_dir):
    module = RLOO(**small(tiny_policy_dir, samples_per_prompt=3))
    traj = module.collect(module.task.examples("train")[:2])
    traj.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    raw = module.compute_advantages(traj)
    # RLOO by hand: prompt 0 rewards (1, 0, 0) -> 1 - 0 = 1, 0 - 0.5 = -0.5, -0.5
    first = raw[0][traj.response_mask[0].bool()]
    assert torch.allclose(first, torch.full_like(first, 1.0))
    module.hparams.whiten_advantages = True
    white = module.compute_advantages(traj)
    valid = white[traj.response_mask.bool()]
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std()) - 1.0) < 1e-3
    assert not torch.allclose(raw, white)


def test_old_logprobs_are_the_samplers_and_equal_a_second_scoring_pass(tiny_policy_dir, monkeypatch):
    module = GRPO(**small(tiny_policy_dir, temperature=0.7, samples_per_prompt=4))
    examples = module.task.examples("train")[:4]
    module.engine.reseed(5)
    reused = module.collect(examples)
    module.hparams.recompute_old_logprobs = True
    module.engine.reseed(5)
    rescored = module.collect(examples)
    assert torch.equal(reused.input_ids, rescored.input_ids)  # the same samples
    mask = reused.response_mask.bool()
    torch.testing.assert_close(reused.old_logprobs[mask], rescored.old_logprobs[mask], atol=1e-4, rtol=0)
    # by default the loop runs no policy forward pass after sampling: only the reference's
    calls = []
    monkeypatch.setattr("lit_reason.methods.online.response_logprobs", lambda *a, **k: calls.append(1))
    module.hparams.recompute_old_logprobs = False
    module.collect(examples)
    assert calls == []
