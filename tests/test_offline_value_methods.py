"""OREO and DQO modules on the real tiny model: update order, disjoint updates, losses, values, I/O.

A small trajectory dataset is collected once with a copy of the session's tiny model (biased
towards newline and EOS, so responses have several steps and finish); the first sample of each
prompt is then marked correct so that rewards and the balanced selection are mixed.
"""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch

from lit_reason.data.collect import collect
from lit_reason.data.trajectories import TrajectoryDataset
from lit_reason.losses.dqo import dqo_policy_loss, dqo_value_loss
from lit_reason.losses.oreo import oreo_importance_weights, oreo_policy_loss, oreo_value_loss
from lit_reason.methods.dqo import DQO
from lit_reason.methods.oreo import OREO
from lit_reason.models.logprobs import full_kl, gather_logprobs, response_logits
from lit_reason.models.policy import build_policy
from lit_reason.models.value import ValueModel
from lit_reason.tasks import get_task

TASK = {"name": "arithmetic", "n_train": 16, "n_validation": 4, "n_test": 4}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model)
    bias = torch.zeros(len(tiny_tokenizer))
    bias[tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]] = 4.0
    bias[tiny_tokenizer.eos_token_id] = 2.5
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias.to(out.dtype))
    task = get_task("arithmetic", **{k: v for k, v in TASK.items() if k != "name"})
    out = tmp_path_factory.mktemp("offline_value") / "data"
    collect((model, tiny_tokenizer), task, out, samples=3, limit=4, max_new_tokens=12, chunk_size=4,
            temperature=1.0, seed=3, progress=False, policy_name="biased-tiny")
    for shard in out.glob("shard-*.jsonl"):  # sample 0 of every prompt counts as correct
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        for r in rows:
            r["reward"] = 1.0 if r["sample_index"] == 0 else 0.0
        shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def make(cls, policy: str, data, **kw):
    args = dict(policy=policy, task=TASK, data=str(data), batch_size=64, max_new_tokens=12, progress=False,
                rollout_batch_size=64, eval_limit=4, lr=1e-3, critic_lr=1e-3)
    args.update(kw)
    return cls(**args)


def fit(module, steps: int = 2, callbacks=()) -> pl.Trainer:
    # manual optimisation with two optimisers: global_step counts both, so 2 steps = one batch
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module)
    return trainer


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def changed(before: list[torch.Tensor], model: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class StepSpy(pl.Callback):
    """Hooks each optimiser's ``step`` and records which model changed during it."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bool, bool]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        for index, opt in enumerate(trainer.optimizers):
            before: dict[str, list[torch.Tensor]] = {}

            def pre(_opt, _args, _kwargs, _before=before):
                _before["policy"], _before["value"] = snapshot(pl_module.policy), snapshot(pl_module.value_model)

            def post(_opt, _args, _kwargs, _index=index, _before=before):
                self.events.append((_index, changed(_before["value"], pl_module.value_model),
                                    changed(_before["policy"], pl_module.policy)))

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)


def batch_of_all_items(module):
    """The rows of the first (and only) training batch, and their TrajectoryBatch."""
    rows = module.select_items(module.load_rows())
    return rows, TrajectoryDataset.to_batch(rows, module.tokenizer.pad_token_id)


def independent_tensors(module, policy_dir: str, b):
    """log pi, log pi_ref, exact KL and V from models built here (policy and reference = the start policy)."""
    start, _ = build_policy(policy_dir)
    with torch.no_grad():
        logits = response_logits(start, b.input_ids, b.attention_mask, b.prompt_len)
        resp = b.input_ids[:, b.prompt_len :]
        logp = gather_logprobs(logits, resp)
        values = module.value_model(b.input_ids, b.attention_mask)[:, b.prompt_len - 1 : -1]
    return logp, logp.clone(), full_kl(logits, logits.clone()), values


@pytest.mark.parametrize("cls", [OREO, DQO])
def test_value_model_is_separate_and_starts_at_zero(cls, tiny_policy_dir, dataset):
    module = make(cls, tiny_policy_dir, dataset)
    assert isinstance(module.value_model, ValueModel)
    assert module.value_model.head.bias is None
    assert torch.count_nonzero(module.value_model.head.weight) == 0
    policy_ptrs = {p.data_ptr() for p in module.policy.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in module.value_model.parameters()}
    _, b = batch_of_all_items(module)
    with torch.no_grad():
        values = module.value_model.response_values(b.input_ids, b.attention_mask, b.prompt_len)
    assert torch.count_nonzero(values) == 0


@pytest.mark.parametrize("cls", [OREO, DQO])
def test_critic_steps_first_and_each_step_changes_only_its_model(cls, tiny_policy_dir, dataset):
    module = make(cls, tiny_policy_dir, dataset)
    spy = StepSpy()
    trainer = fit(module, steps=4, callbacks=[spy])
    assert trainer.global_step == 4
    # optimiser 0 = critic changes only V_phi; optimiser 1 = policy changes only pi_theta; critic first
    assert spy.events == [(0, True, False), (1, False, True)] * 2


def test_oreo_training_step_loss_equals_the_loss_functions(tiny_policy_dir, dataset):
    torch.manual_seed(0)
    module = make(OREO, tiny_policy_dir, dataset)
    torch.nn.init.normal_(module.value_model.head.weight, std=0.5)  # nonzero values, so V matters
    rows, b = batch_of_all_items(module)
    assert len(rows) <= module.hparams.batch_size  # one batch holds every item
    logp, ref, kl, values = independent_tensors(module, tiny_policy_dir, b)
    rewards, mask = b.rewards.float(), b.response_mask
    critic, _ = oreo_value_loss(values, logp, ref, rewards, mask, beta=0.03)
    policy, _ = oreo_policy_loss(logp, ref, values, rewards, mask, beta=0.03, alpha=0.01, kl=kl)
    trainer = fit(module, steps=2)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/value_loss"], critic, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["train/loss"], policy, rtol=1e-5, atol=1e-6)
    assert float(metrics["data/items_positive"]) == 4  # one correct sample per prompt, all kept
    assert float(metrics["data/items_negative"]) == 8


def test_dqo_training_step_loss_equals_the_loss_functions(tiny_policy_dir, dataset):
    torch.manual_seed(0)
    module = make(DQO, tiny_policy_dir, dataset, lam=0.8)
    torch.nn.init.normal_(module.value_model.head.weight, std=0.5)
    _, b = batch_of_all_items(module)
    logp, ref, _, values = independent_tensors(module, tiny_policy_dir, b)
    rewards, mask = b.rewards.float(), b.response_mask
    weights = oreo_importance_weights(logp, ref, mask, cap=1.0)
    critic, _ = dqo_value_loss(values, logp, ref, rewards, mask, beta=0.03, lam=0.8)
    policy, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=0.03, lam=0.8, importance_weights=weights)
    metrics = fit(module, steps=2).callback_metrics
    torch.testing.assert_close(metrics["train/value_loss"], critic, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["train/loss"], policy, rtol=1e-5, atol=1e-6)
    assert float(metrics["train/weight_mean"]) == pytest.approx(1.0)  # pi_theta = pi_ref at the start


@pytest.mark.parametrize("mode,alpha", [("step", 0.1), ("response", 0.3)])
def test_step_and_response_modes_train(mode, alpha, tiny_policy_dir, dataset):
    module = make(OREO, tiny_policy_dir, dataset, mode=mode, importance_sampling=True)
    assert module.alpha == alpha
    policy, value = snapshot(module.policy), snapshot(module.value_model)
    metrics = fit(module, steps=2).callback_metrics
    assert changed(policy, module.policy) and changed(value, module.value_model)
    for key in ("train/loss", "train/value_loss", "train/kl", "train/critic/value_loss"):
        assert torch.isfinite(metrics[key]), key


def test_state_values_explicit_and_implicit(tiny_policy_dir, dataset):
    torch.manual_seed(1)
    module = make(OREO, tiny_policy_dir, dataset, beta=0.5)
    torch.nn.init.normal_(module.value_model.head.weight, std=0.5)
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are nonzero
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = module.load_rows()[:3]
    prompts = [r["prompt_ids"] for r in rows] * 2
    partials = [[] for _ in rows] + [r["response_ids"][:5] for r in rows]
    module.eval()
    explicit = module.state_values(prompts, partials, [])
    module.hparams.value_source = "implicit"
    implicit = module.state_values(prompts, partials, [])
    assert explicit.shape == implicit.shape == (6,)
    torch.testing.assert_close(implicit[:3], explicit[:3])  # S_0: both are V_phi(prompt)
    # by hand on one state: V(s_0) + beta * sum_t [log pi - log pi_ref] over the partial response
    p, q = prompts[3], partials[3]
    ids = torch.tensor([p + q])
    with torch.no_grad():
        v0 = module.value_model(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))[0, -1]
        logp = torch.log_softmax(module.policy(input_ids=ids).logits[0].float(), -1)
        ref = torch.log_softmax(module.reference.model(input_ids=ids).logits[0].float(), -1)
    positions = torch.arange(len(p) - 1, len(p) + len(q) - 1)
    tokens = torch.tensor(q)
    ratio = (logp[positions, tokens] - ref[positions, tokens]).sum()
    assert abs(float(ratio)) > 1e-3
    torch.testing.assert_close(implicit[3], v0 + 0.5 * ratio, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(implicit[3:], explicit[3:])


@pytest.mark.parametrize("cls,kwargs,name", [
    (OREO, {"mode": "token-ish"}, "mode"),
    (OREO, {"beta": 0.0}, "beta"),
    (OREO, {"alpha": -1.0}, "alpha"),
    (OREO, {"value_source": "mc"}, "value_source"),
    (OREO, {"selection": "best"}, "selection"),
    (DQO, {"beta": -0.1}, "beta"),
    (DQO, {"lam": 1.5}, "lam"),
    (DQO, {"token_reduction": "max"}, "token_reduction"),
])
def test_bad_arguments_are_named(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(policy="unused", **kwargs)


@pytest.mark.parametrize("cls", [OREO, DQO])
def test_checkpoint_round_trip_keeps_both_models(cls, tiny_policy_dir, dataset, tmp_path):
    module = make(cls, tiny_policy_dir, dataset)
    trainer = fit(module, steps=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    assert torch.count_nonzero(module.value_model.head.weight) > 0  # trained: the round trip is meaningful
    loaded = cls.load_from_checkpoint(path, task=TASK)
    for a, b in ((module.policy, loaded.policy), (module.value_model, loaded.value_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert loaded.hparams.beta == module.hparams.beta
    assert str(loaded.data_path) == str(module.data_path)
