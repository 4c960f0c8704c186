"""DVPO's two LightningModules on the tiny model: stage 1 (GVM by TD(lambda)) and stage 2 (frozen GVM).

The TD(lambda) targets on hand-computed tensors are tested in tests/test_losses_dvpo.py; here:
the module's targets with +-1 outcomes, the GVM staying frozen through training, checkpoints that
reload it frozen (and by reference, not by copy), the advantage identities, and clear errors.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_reason.methods.dvpo import DVPO, ensure_gvm, gvm_cache_path, load_gvm
from lit_reason.methods.dvpo_gvm import DVPOGVM, gvm_response_values
from lit_reason.models.value import ValueModel
from helpers import force_eos

TASK = {"name": "arithmetic", "n_train": 64, "n_validation": 8, "n_test": 8}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def fit(module, steps: int = 2, **kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(module)
    return trainer


@pytest.fixture(scope="module")
def gvm_dir(tmp_path_factory, tiny_policy_dir, tiny_tokenizer):
    """A GVM folder: a value model on the tiny trunk with a random (non-zero) head."""
    torch.manual_seed(0)
    model = ValueModel.from_policy_name(tiny_policy_dir, bias=True, zero_init=False)
    with torch.no_grad():
        model.head.bias.fill_(0.1)
    return model.save(tmp_path_factory.mktemp("gvm") / "gvm", tokenizer=tiny_tokenizer)


def stage2(policy: str, gvm, **kw) -> DVPO:
    base = dict(policy=policy, task=TASK, gvm=str(gvm) if gvm else None, prompts_per_iteration=4, samples_per_prompt=1,
                minibatch_size=4, max_new_tokens=12, progress=False, rollout_batch_size=64, kl_coef=0.0)
    base.update(kw)
    return DVPO(**base)


# ---- stage 1 ------------------------------------------------------------------------------------
def test_stage1_trains_the_gvm_only_with_pm1_td_targets(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    module = DVPOGVM(policy=tiny_policy_dir, task=TASK, data=str(tmp_path / "data"), collect={"samples": 2, "limit": 4},
                     max_new_tokens=12, batch_size=4, lr=1e-3, holdout_fraction=0.25, progress=False)
    assert module.reference is None and not any(p.requires_grad for p in module.policy.parameters())
    policy_before = [p.detach().clone() for p in module.policy.parameters()]
    head_before = module.value_model.head.weight.detach().clone()
    assert torch.all(head_before == 0)  # trl's v_head: zero-initialised, with bias
    trainer = fit(module, steps=4, limit_val_batches=1.0)
    assert trainer.global_step == 4  # optimiser steps: 2 batches x epochs_per_batch 2
    assert not torch.equal(module.value_model.head.weight, head_before)
    assert all(torch.equal(a, b) for a, b in zip(policy_before, module.policy.parameters()))
    assert not module.policy.training
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.value_model.parameters()}
    assert module.data_stats["data/heldout_prompts"] == 1.0
    assert "gvm/val_loss" in trainer.callback_metrics and "gvm/pairs" in trainer.callback_metrics

    # the module's targets: zero values + the outcome at the end -> G_t = lam^(m-1-t) * (+-1)
    rows = module._items[:2]
    b = module.to_batch(rows)
    with torch.no_grad():
        module.value_model.head.weight.zero_()
        module.value_model.head.bias.zero_()
    g = module.td_targets(b)
    for i, r in enumerate(rows):
        m = len(r["response_ids"])
        sign = 1.0 if r["reward"] > 0 else -1.0
        expected = torch.tensor([0.95 ** (m - 1 - t) * sign for t in range(m)])
        torch.testing.assert_close(g[i, :m], expected)
        assert torch.all(g[i, m:] == 0)


def test_gvm_response_values_reads_states_before_each_token(gvm_dir, tiny_policy_dir):
    from lit_reason.data.trajectories import TrajectoryDataset

    gvm = ValueModel.load(gvm_dir)
    rows = [{"prompt_index": 0, "sample_index": 0, "prompt_ids": [5, 6, 7], "response_ids": [8, 9, 2],
             "step_ends": [2], "reward": 1.0, "finish": "eos", "behaviour_logprobs": [0.0] * 3, "response": "a"},
            {"prompt_index": 1, "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [10, 2],
             "step_ends": [1], "reward": 0.0, "finish": "eos", "behaviour_logprobs": [0.0] * 2, "response": "b"}]
    b = TrajectoryDataset.to_batch(rows, pad_token_id=0)
    with torch.no_grad():
        values, final = gvm_response_values(gvm, b)
        expected = gvm.values_of([[5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8, 9], [5, 6], [5, 6, 10]], pad_token_id=0)
    torch.testing.assert_close(values[0], expected[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values[1, :2], expected[3:], rtol=1e-4, atol=1e-5)
    assert values[1, 2] == 0
    torch.testing.assert_close(final, torch.stack([expected[2], expected[4]]), rtol=1e-4, atol=1e-5)


# ---- stage 2: the frozen GVM --------------------------------------------------------------------
def test_gvm_gets_no_gradient_and_stays_frozen_in_eval(gvm_dir, tiny_policy_dir):
    torch.manual_seed(0)
    module = stage2(tiny_policy_dir, gvm_dir)
    handle = force_eos(module)
    gvm_before = {k: v.clone() for k, v in module.gvm.state_dict().items()}
    policy_before = [p.detach().clone() for p in module.policy.parameters()]
    module.train()
    assert not module.gvm.training and module.policy.training  # train() leaves the GVM in eval
    trainer = fit(module, steps=2)
    handle.remove()
    assert trainer.global_step >= 2
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, module.policy.parameters()))
    for k, v in module.gvm.state_dict().items():
        assert torch.equal(v, gvm_before[k]), k
    for p in module.gvm.parameters():
        assert not p.requires_grad and p.grad is None
    assert not any(m.training for m in module.gvm.modules())
    gvm_ids = {id(p) for p in module.gvm.parameters()}
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            assert not gvm_ids & {id(p) for p in group["params"]}
        assert not gvm_ids & {id(p) for p in opt.state}
    assert torch.isfinite(trainer.callback_metrics["train/pg_loss"])
    assert "train/gvm_outcome_mae" in trainer.callback_metrics


def test_checkpoint_holds_the_gvm_by_reference_and_reloads_it_frozen(tmp_path, gvm_dir, tiny_policy_dir):
    torch.manual_seed(0)
    module = stage2(tiny_policy_dir, gvm_dir)
    handle = force_eos(module)
    trainer = fit(module, steps=2)
    handle.remove()
    ckpt = tmp_path / "dvpo.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not [k for k in state["state_dict"] if k.startswith("gvm.")]  # saved once, as its folder
    assert any(k.startswith("policy.") for k in state["state_dict"])
    assert state["lit_reason_dvpo"]["gvm_path"] == str(gvm_dir)
    # no optimiser state for the GVM: the optimiser holds the policy's parameters only
    n_policy = sum(1 for p in module.policy.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in state["optimizer_states"][0]["param_groups"]) == n_policy

    reloaded = DVPO.load_from_checkpoint(ckpt, task=TASK)
    assert not reloaded.gvm.training and not any(p.requires_grad for p in reloaded.gvm.parameters())
    for (k, a), b in zip(module.gvm.state_dict().items(), reloaded.gvm.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(module.policy.parameters(), reloaded.policy.parameters()):
        assert torch.equal(a, b)
    reloaded.train()
    assert not reloaded.gvm.training

    # resuming through the trainer keeps it frozen too
    resumed = stage2(tiny_policy_dir, gvm_dir)
    handle = force_eos(resumed)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(resumed, ckpt_path=ckpt)
    handle.remove()
    assert trainer.global_step == 4
    assert all(p.grad is None and not p.requires_grad for p in resumed.gvm.parameters())


def test_checkpoint_refuses_a_changed_gvm_folder(tmp_path, gvm_dir, tiny_policy_dir, tiny_tokenizer):
    module = stage2(tiny_policy_dir, gvm_dir)
    ckpt = {"lit_reason_dvpo": {"gvm_path": "/elsewhere", "gvm_fingerprint": "0" * 64}}
    with pytest.raises(ValueError, match="fingerprint"):
        module.on_load_checkpoint(ckpt)


def test_gvm_with_another_tokenizer_is_refused(tmp_path, tiny_policy_dir, tiny_tokenizer):
    import copy

    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<not-in-the-policy>"])
    path = ValueModel.from_policy_name(tiny_policy_dir).save(tmp_path / "gvm", tokenizer=other)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_gvm(path, tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="value model"):
        stage2(tiny_policy_dir, tiny_policy_dir)  # a policy folder is not a GVM


# ---- stage 2: advantages ------------------------------------------------------------------------
def test_advantage_identities(gvm_dir, tiny_policy_dir):
    torch.manual_seed(0)
    raw = dict(whiten_values=False, whiten_advantages=False)
    module = stage2(tiny_policy_dir, gvm_dir, samples_per_prompt=2, kl_reward_coef=0.0, lam=1.0, **raw)
    handle = force_eos(module)
    traj = module.collect(module.task.examples("train")[:3])
    handle.remove()
    mask = traj.response_mask
    values, final = module.gvm_values(traj)
    # gae, gamma = lam = 1, no KL reward: A_t = R^ - V(s_t), R^ = V(s_{m-1}) (the outcome estimate)
    adv = module.compute_advantages(traj)
    torch.testing.assert_close(adv, (final.unsqueeze(1) - values) * mask)
    # the verifier's +-1 outcome adds at the end of every token's return
    module.hparams.use_task_reward = True
    adv_task = module.compute_advantages(traj)
    sign = (traj.rewards > 0).float() * 2 - 1
    torch.testing.assert_close(adv_task, (final.unsqueeze(1) - values + sign.unsqueeze(1)) * mask)
    # static: Q(s_t, a_t) = V(s_{t+1}), the outcome estimate for the last token
    module.hparams.use_task_reward = False
    module.hparams.advantage = "static"
    q = module.compute_advantages(traj)
    for i in range(len(traj)):
        m = int(mask[i].sum())
        torch.testing.assert_close(q[i, : m - 1], values[i, 1:m])
        torch.testing.assert_close(q[i, m - 1], final[i])
    # whitened (the default): zero mean over valid tokens
    module.hparams.whiten_values = module.hparams.whiten_advantages = True
    module.hparams.advantage = "gae"
    white = module.compute_advantages(traj)[mask.bool()]
    assert abs(float(white.mean())) < 1e-5


def test_bad_settings_fail_clearly(gvm_dir, tiny_policy_dir):
    with pytest.raises(ValueError, match="advantage"):
        stage2(tiny_policy_dir, gvm_dir, advantage="q")
    with pytest.raises(ValueError, match="use_task_reward"):
        stage2(tiny_policy_dir, gvm_dir, advantage="static", use_task_reward=True)


def test_gvm_cache_key_follows_the_stage1_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_REASON_CACHE", str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {}\n")
    a = gvm_cache_path("embedded:arithmetic", {"name": "arithmetic"}, recipe)
    assert a == gvm_cache_path("embedded:arithmetic", {"name": "arithmetic"}, recipe)
    assert a.parent == tmp_path
    assert a != gvm_cache_path("embedded:arithmetic", {"name": "arithmetic", "n_train": 8}, recipe)
    assert a != gvm_cache_path("embedded:arithmetic", {"name": "arithmetic"}, recipe, ["--trainer.max_steps", "1"])
    recipe.write_text("model: {lr: 1}\n")
    assert a != gvm_cache_path("embedded:arithmetic", {"name": "arithmetic"}, recipe)


STAGE1_RECIPE = """\
trainer:
  accelerator: cpu
  max_steps: 2
  limit_val_batches: 0
  enable_checkpointing: false
  logger: false
  callbacks:
    - class_path: lit_reason.callbacks.ExportPolicy
      init_args: {value_dirpath: "${trainer.default_root_dir}/gvm"}
model:
  class_path: lit_reason.methods.dvpo_gvm.DVPOGVM
  init_args: {collect: {samples: 2, limit: 4}, max_new_tokens: 12, batch_size: 4, progress: false}
"""


@pytest.mark.slow
def test_stage1_is_built_on_first_use_then_reused(tmp_path, monkeypatch, tiny_policy_dir):
    monkeypatch.setenv("LIT_REASON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = tmp_path / "stage1.yaml"
    recipe.write_text(STAGE1_RECIPE)
    path = ensure_gvm(tiny_policy_dir, TASK, recipe)
    assert (path / "value_head.json").is_file() and path.parent == tmp_path / "cache"
    assert not list(path.parent.glob(".*build-*"))  # the work folder is gone
    stamp = (path / "value_head.pt").stat().st_mtime_ns
    assert ensure_gvm(tiny_policy_dir, TASK, recipe) == path  # reused, not retrained
    assert (path / "value_head.pt").stat().st_mtime_ns == stamp
    module = stage2(tiny_policy_dir, None, gvm_recipe=str(recipe))  # gvm: null finds the cached GVM
    assert module.gvm is None  # nothing is built or loaded in the constructor ...
    module.setup("fit")  # ... but at fit time
    assert module.gvm_path == str(path) and module.hparams.gvm == str(path)
