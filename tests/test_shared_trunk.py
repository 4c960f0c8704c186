"""Value models on the LoRA policy's own trunk (``share_trunk``): one copy of the base weights, a
second adapter for the value model, each optimiser on its own adapter, save/export/resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import biased_copy, force_eos
from lit_reason.callbacks.export import ADAPTER_SUBDIR, save_policy
from lit_reason.data.collect import collect
from lit_reason.losses.ppo import ppo_policy_loss
from lit_reason.methods.dqo import DQO
from lit_reason.methods.oreo import OREO
from lit_reason.methods.ppo import PPO
from lit_reason.models.logprobs import response_logprobs
from lit_reason.models.shared_trunk import VALUE_ADAPTER, adapter_parameters, check_not_sharded
from lit_reason.models.value import ValueModel
from lit_reason.tasks import get_task

TASK = {"name": "arithmetic", "n_train": 16, "n_validation": 4, "n_test": 4}
# random B (peft's init_lora_weights=False): adapters change the outputs from the start, so a test
# can tell which adapter a forward ran
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A 4-prompt x 3-sample offline dataset, sample 0 of every prompt rewarded."""
    task = get_task("arithmetic", **{k: v for k, v in TASK.items() if k != "name"})
    out = tmp_path_factory.mktemp("shared_trunk") / "data"
    collect((biased_copy(tiny_model, tiny_tokenizer), tiny_tokenizer), task, out, samples=3, limit=4,
            max_new_tokens=12, chunk_size=4, temperature=1.0, seed=3, progress=False, policy_name="biased-tiny")
    for shard in out.glob("shard-*.jsonl"):
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        shard.write_text("".join(json.dumps({**r, "reward": float(r["sample_index"] == 0)}) + "\n" for r in rows))
    return out


def offline(cls, policy: str, data, **kw):
    args = dict(policy=policy, task=TASK, data=str(data), batch_size=64, max_new_tokens=12, progress=False,
                rollout_batch_size=64, eval_limit=4, lr=1e-3, critic_lr=1e-3, lora=LORA, share_trunk=True)
    args.update(kw)
    return cls(**args)


def online(policy: str, **kw):
    args = dict(policy=policy, task=TASK, prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4,
                max_new_tokens=12, progress=False, rollout_batch_size=64, lora=LORA, share_trunk=True)
    args.update(kw)
    return PPO(**args)


def fit(module, steps: int, callbacks=(), **kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, **kw)
    return trainer


def value_model_of(module) -> ValueModel:
    return module.critic if isinstance(module, PPO) else module.value_model


def parts(module) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters by owner: base weights, policy adapter, value adapter, value head."""
    policy = module.policy
    pol, val = adapter_parameters(policy, "default"), adapter_parameters(policy, VALUE_ADAPTER)
    adapters = {id(p) for p in pol + val}
    return {"base": [p for p in policy.parameters() if id(p) not in adapters], "policy_adapter": pol,
            "value_adapter": val, "head": list(value_model_of(module).head.parameters())}


def snapshot(module) -> dict[str, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in ps] for k, ps in parts(module).items()}


def changed_parts(before: dict, module) -> set[str]:
    now = parts(module)
    return {k for k in now if any(not torch.equal(a, b) for a, b in zip(before[k], now[k]))}


def some_ids(n: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 60, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one right-padded row
    return ids, mask


def policy_logits(policy, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return policy(input_ids=ids, attention_mask=mask).logits


# ---- one copy of the base weights -------------------------------------------------------------
@pytest.mark.parametrize("cls", [OREO, DQO, PPO])
def test_value_trunk_is_the_policy_trunk(cls, tiny_policy_dir, dataset):
    module = online(tiny_policy_dir) if cls is PPO else offline(cls, tiny_policy_dir, dataset)
    vm = value_model_of(module)
    assert vm.trunk is module.policy.base_model.model.model
    base = parts(module)["base"]
    assert base and all(not p.requires_grad for p in base)
    # the value trunk's base weights are the policy's very tensors: nothing but the head is its own
    policy_ptrs = {p.data_ptr() for p in module.policy.parameters()}
    own = [p for p in vm.parameters() if p.data_ptr() not in policy_ptrs]
    assert {id(p) for p in own} == {id(p) for p in vm.head.parameters()}
    shared_base = [p for p in vm.trunk.parameters() if not any(p is q for q in parts(module)["policy_adapter"]
                                                                + parts(module)["value_adapter"])]
    assert shared_base and {p.data_ptr() for p in shared_base} <= {p.data_ptr() for p in base}
    assert module.reference.shares_policy and module.reference.model is module.policy
    assert module.trainable_models().keys() >= {"policy"}


# ---- the policy and the reference are untouched by the value adapter -----------------------------
def test_policy_logits_and_reference_are_unchanged_by_the_value_adapter(tiny_policy_dir):
    ids, mask = some_ids()
    torch.manual_seed(0)
    separate = online(tiny_policy_dir, share_trunk=False)
    torch.manual_seed(0)
    shared = online(tiny_policy_dir)
    expected = policy_logits(separate.policy, ids, mask)
    torch.testing.assert_close(policy_logits(shared.policy, ids, mask), expected, rtol=0, atol=0)
    # a value forward switches adapters and back: the policy reads its own adapter afterwards
    values = shared.critic(ids, mask)
    assert shared.policy.base_model.active_adapter in ("default", ["default"])
    torch.testing.assert_close(policy_logits(shared.policy, ids, mask), expected, rtol=0, atol=0)
    # ... and the value forward really ran the value adapter (random B: it changes the hidden states)
    with torch.no_grad():
        plain = shared.critic.head(shared.critic.trunk(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert not torch.allclose(values.detach(), plain.squeeze(-1))
    # the reference is the base model: every adapter off
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    with torch.no_grad():
        want = response_logprobs(base, ids, mask, 4)
    torch.testing.assert_close(shared.reference.logprobs(ids, mask, 4), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(response_logprobs(shared.policy, ids, mask, 4).detach(), want)


# ---- each loss trains its own adapter ----------------------------------------------------------
class StepSpy(pl.Callback):
    """Records which parameter parts changed during each optimiser step."""

    def __init__(self) -> None:
        self.events: list[tuple[int, set[str]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        for index, opt in enumerate(trainer.optimizers):
            store: dict = {}

            def pre(_opt, _args, _kwargs, _store=store):
                _store["before"] = snapshot(pl_module)

            def post(_opt, _args, _kwargs, _index=index, _store=store):
                self.events.append((_index, changed_parts(_store["before"], pl_module)))

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)


@pytest.mark.parametrize("cls", [OREO, DQO])
def test_offline_critic_step_trains_the_value_adapter_and_policy_step_the_policy_adapter(cls, tiny_policy_dir,
                                                                                          dataset):
    torch.manual_seed(0)
    module = offline(cls, tiny_policy_dir, dataset)
    torch.nn.init.normal_(module.value_model.head.weight, std=0.5)  # a zero head passes no gradient to the adapter
    spy = StepSpy()
    trainer = fit(module, steps=4, callbacks=[spy])
    critic_parts, policy_parts = {"value_adapter", "head"}, {"policy_adapter"}
    assert spy.events == [(0, critic_parts), (1, policy_parts)] * 2  # base weights never change
    critic_opt, policy_opt = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    ids = [{id(p) for g in o.param_groups for p in g["params"]} for o in (critic_opt, policy_opt)]
    p = parts(module)
    assert ids[0] == {id(q) for q in p["value_adapter"] + p["head"]}
    assert ids[1] == {id(q) for q in p["policy_adapter"]}
    assert all(q.requires_grad for q in p["value_adapter"] + p["policy_adapter"])


def test_ppo_losses_reach_only_their_own_adapter_and_a_step_keeps_the_base(tiny_policy_dir):
    torch.manual_seed(0)
    module = online(tiny_policy_dir)
    handle = force_eos(module)
    opt = module.configure_optimizers()
    groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
    p = parts(module)
    assert groups == [{id(q) for q in p["policy_adapter"]}, {id(q) for q in p["value_adapter"] + p["head"]}]
    traj = module.collect(module.task.examples("train")[:2])  # its reference pass re-freezes peft's inactive adapter
    assert traj.finished.any()
    traj.advantages = module.compute_advantages(traj)
    for name, loss_of in (("value", lambda: module.critic_loss(traj)[0]),
                          ("policy", lambda: ppo_policy_loss(
                              response_logprobs(module.policy, traj.input_ids, traj.attention_mask, traj.prompt_len),
                              traj.old_logprobs, traj.advantages, traj.response_mask)[0])):
        module.zero_grad(set_to_none=True)
        loss_of().backward()
        with_grad = {k for k, ps in parts(module).items() if any(q.grad is not None and q.grad.abs().sum() > 0
                                                                 for q in ps)}
        assert with_grad == ({"value_adapter", "head"} if name == "value" else {"policy_adapter"}), name
    module.zero_grad(set_to_none=True)
    before = snapshot(module)
    fit(module, steps=2)
    handle.remove()
    assert changed_parts(before, module) == {"policy_adapter", "value_adapter", "head"}


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [OREO, DQO, PPO])
def test_share_trunk_without_lora_is_a_one_line_error(cls):
    with pytest.raises(ValueError) as err:
        cls(policy="unused", share_trunk=True)
    message = str(err.value)
    assert "\n" not in message and "share_trunk" in message and "lora" in message


def test_share_trunk_refuses_whole_module_adapters():
    with pytest.raises(ValueError, match="share_trunk.*lora.modules_to_save"):
        PPO(policy="unused", share_trunk=True, lora={**LORA, "modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match="share_trunk.*critic_lora.modules_to_save"):
        OREO(policy="unused", share_trunk=True, lora=LORA, critic_lora={**LORA, "modules_to_save": ["lm_head"]})


def test_share_trunk_is_refused_under_fsdp():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    check_not_sharded(SimpleNamespace(_trainer=SimpleNamespace(strategy=DDPStrategy())))  # fine
    with pytest.raises(ValueError, match="share_trunk.*FSDP") as err:
        check_not_sharded(SimpleNamespace(_trainer=SimpleNamespace(strategy=ModelParallelStrategy())))
    assert "\n" not in str(err.value)


# ---- save, export, checkpoint --------------------------------------------------------------------
def test_saved_value_model_and_exported_policy_reproduce_their_outputs(tiny_policy_dir, dataset, tmp_path):
    torch.manual_seed(1)
    module = offline(OREO, tiny_policy_dir, dataset)
    torch.nn.init.normal_(module.value_model.head.weight, std=0.5)
    fit(module, steps=2)  # trained adapters and head
    module.eval()
    ids, mask = some_ids()
    with torch.no_grad():
        values = module.value_model(ids, mask)
    logits = policy_logits(module.policy, ids, mask)
    module.value_model.save(tmp_path / "value", tokenizer=module.tokenizer)
    save_policy(module.policy, module.tokenizer, tmp_path / "policy")
    # the live model is intact after both saves: one trunk, the policy's adapter active
    assert module.value_model.trunk is module.policy.base_model.model.model
    torch.testing.assert_close(policy_logits(module.policy, ids, mask), logits, rtol=0, atol=0)
    loaded = ValueModel.load(tmp_path / "value").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), values, rtol=1e-4, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    torch.testing.assert_close(policy_logits(exported, ids, mask), logits, rtol=1e-4, atol=1e-4)
    # the adapter folder holds the policy's adapter only (no `value/` subfolder beside it)
    from peft import PeftModel

    assert not (tmp_path / "policy" / ADAPTER_SUBDIR / VALUE_ADAPTER).exists()

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                        tmp_path / "policy" / ADAPTER_SUBDIR)
    torch.testing.assert_close(policy_logits(adapted, ids, mask), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [OREO, PPO])
def test_checkpoint_round_trip_keeps_the_trunk_shared(cls, tiny_policy_dir, dataset, tmp_path):
    torch.manual_seed(2)
    module = online(tiny_policy_dir) if cls is PPO else offline(cls, tiny_policy_dir, dataset)
    handle = force_eos(module) if cls is PPO else None
    trainer = fit(module, steps=2)
    if handle is not None:
        handle.remove()
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    vm_key = "critic" if cls is PPO else "value_model"
    # the shared tensors are saved under both names
    assert any(k.startswith(f"{vm_key}.trunk.") and ".lora_A.value." in k for k in state)
    loaded = cls.load_from_checkpoint(tmp_path / "last.ckpt", task=TASK)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert value_model_of(loaded).trunk is loaded.policy.base_model.model.model
    ids, mask = some_ids()
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(value_model_of(loaded)(ids, mask), value_model_of(module)(ids, mask),
                                   rtol=0, atol=0)


class SaveAt(pl.Callback):
    """Saves a checkpoint when the run reaches ``step`` (as ``ModelCheckpoint`` would, after a batch)."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_offline_resume_continues_the_run(tiny_policy_dir, dataset, tmp_path):
    # one batch per epoch, two optimiser steps per batch: 4 steps = 2 batches, resumed after the first
    torch.manual_seed(3)
    straight = offline(OREO, tiny_policy_dir, dataset)
    fit(straight, steps=4, callbacks=[SaveAt(2, tmp_path / "half.ckpt")])
    torch.manual_seed(3)
    resumed = offline(OREO, tiny_policy_dir, dataset)
    trainer = fit(resumed, steps=4, ckpt_path=str(tmp_path / "half.ckpt"))
    assert trainer.global_step == 4
    half = torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(half[k], v) for k, v in straight.state_dict().items())  # it trained on
    # to float rounding: the same harness without share_trunk differs by ~1e-7 too
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert resumed.value_model.trunk is resumed.policy.base_model.model.model


DDP_SCRIPT = """
import json, sys, torch, lightning.pytorch as pl
from lit_reason.methods import PPO
policy, out, lora = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
module = PPO(policy=policy, task={"name": "arithmetic", "n_train": 64, "n_validation": 8, "n_test": 8},
             prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4, max_new_tokens=10,
             progress=False, seed=0, lora=lora, share_trunk=True)
eos = module.tokenizer.eos_token_id
module.policy.base_model.model.lm_head.register_forward_hook(lambda m, i, o: o.index_add(-1, torch.tensor([eos]),
                                                                                        torch.full_like(o[..., :1], 3.0)))
head = module.critic.head.weight.detach().clone()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0)
trainer.fit(module)
with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
    json.dump({"checksum": sum(float(p.detach().double().sum()) for p in module.parameters()),
               "step": trainer.global_step, "head_moved": not torch.equal(head, module.critic.head.weight)}, f)
"""


@pytest.mark.slow
def test_ppo_with_shared_trunk_under_ddp_stays_in_sync(tmp_path, tiny_policy_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_shared.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, str(script), tiny_policy_dir, str(out), json.dumps(LORA)], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] >= 2 and r0["head_moved"] and r1["head_moved"]
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=0, abs=1e-6)  # gradients all-reduced on both adapters
