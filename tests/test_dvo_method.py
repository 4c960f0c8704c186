"""The DVO LightningModule, its three target sources and the MCTSTargetRefresh callback.

The session's tiny random model is never right on arithmetic, so these tests use a *coin* task:
arithmetic prompts graded by the parity of the response's length (about half of all responses are
"correct"), and the tiny model with its (tied) EOS row scaled up, so responses end after a few
tokens. That gives MCTS trees with correct and incorrect paths in a second.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_reason.callbacks.mcts_refresh import MCTSTargetRefresh
from lit_reason.callbacks.rounds import IterativeRounds
from lit_reason.data.collect import collect
from lit_reason.data.trajectories import TrajectoryDataset, read_meta
from lit_reason.data.dvo_targets import build_target_dataset, check_target_settings
from lit_reason.methods.dvo import DVO
from lit_reason.methods.offline import pack_states
from lit_reason.models.logprobs import response_logprobs
from lit_reason.steps import StepSplitter
from lit_reason.tasks.arithmetic import ArithmeticTask

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL_MCTS = {"limit": 4, "simulations": 6, "width": 3, "max_depth": 3, "leaves_per_tree": 2, "chunk_size": 2,
              "batch_size": 64}


class CoinTask(ArithmeticTask):
    """Arithmetic prompts; a response is "correct" when its text has an even length."""

    def __init__(self):
        super().__init__(seed=0, n_train=8, n_validation=4, n_test=4)

    def reward(self, response, example):
        return 1.0 if len(response) % 2 == 0 else 0.0


@pytest.fixture(scope="module")
def eos_policy_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> str:
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= 16.0
    path = tmp_path_factory.mktemp("eos_policy")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def make(policy, data, **kwargs):
    kwargs.setdefault("targets", SMALL_MCTS)
    return DVO(policy=policy, task=CoinTask(), data=str(data), batch_size=4, max_new_tokens=8, progress=False,
               **kwargs)


@pytest.fixture(scope="module")
def mcts_data(tmp_path_factory, eos_policy_dir) -> Path:
    """An MCTS target dataset built by the module itself (what ``fit`` does on first use)."""
    out = tmp_path_factory.mktemp("dvo") / "mcts"
    module = make(eos_policy_dir, out)
    module.build_targets(out, SMALL_MCTS, policy_name="eos")
    return out


def trainer(tmp_path, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=tmp_path, enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      **kwargs)


# ------------------------------------------------------------------------------------- the loss
def test_training_step_equals_an_independent_dvo_loss(eos_policy_dir, mcts_data):
    module = make(eos_policy_dir, mcts_data, beta=0.5)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all 0
        for p in module.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = module.select_items(module.load_rows())[:4]
    assert len({len(r["step_ends"]) for r in rows}) >= 1
    loss = module.training_step(rows, 1)
    per_sequence = []
    for r in rows:  # one row at a time, steps by hand from step_ends, no padding anywhere
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        P = len(r["prompt_ids"])
        lp = {}
        for name, model in (("pi", module.policy), ("ref", module.reference.model)):
            logits = model(input_ids=ids).logits[0, P - 1 : -1].float()
            lp[name] = F.log_softmax(logits, -1).gather(-1, ids[0, P:, None]).squeeze(-1)
        start, errs = 0, []
        for end, target in zip(r["step_ends"], r["step_targets"]):
            step_ratio = (lp["pi"][start : end + 1] - lp["ref"][start : end + 1]).sum()
            errs.append((0.5 * step_ratio - target) ** 2)
            start = end + 1
        per_sequence.append(torch.stack(errs).mean())  # mean over the row's steps
    expected = torch.stack(per_sequence).mean()  # then over the batch
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())


def test_implicit_state_values_are_beta_times_the_summed_log_ratio(eos_policy_dir, mcts_data):
    module = make(eos_policy_dir, mcts_data, beta=0.2)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    row = module.load_rows()[0]
    prompt, partial = row["prompt_ids"], row["response_ids"][: row["step_ends"][0] + 1]
    got = module.state_values([prompt, prompt], [partial, []], [{}, {}])
    ids, mask, P, _ = pack_states([prompt], [partial], module.tokenizer.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(module.policy, ids, mask, P)
        ref = response_logprobs(module.reference.model, ids, mask, P)
    torch.testing.assert_close(got[0], 0.2 * (lp - ref).sum(), rtol=1e-4, atol=1e-6)
    assert got[1] == 0.0 and module.value_range == (-1.0, 1.0)


# ------------------------------------------------------------------------------ target sources
def test_mcts_dataset_is_a_trajectory_dataset_with_telescoping_targets(mcts_data):
    ds = TrajectoryDataset(mcts_data)
    meta = read_meta(mcts_data)
    assert meta["targets"]["source"] == "mcts" and meta["targets"]["simulations"] == 6
    assert sorted(p.name for p in mcts_data.glob("trees-*")) == ["trees-000000-000001.json",
                                                                 "trees-000002-000003.json"]
    assert len(ds) > 0 and any(r["reward"] > 0 for r in ds) and any(r["reward"] == 0 for r in ds)
    for r in ds:
        assert len(r["step_targets"]) == len(r["step_ends"])
        # sum_k target_k = R - Q(root) on the +-1 scale
        assert sum(r["step_targets"]) == pytest.approx(r["mcts_reward"] - r["q_path"][0])


@pytest.mark.parametrize("source", ["value_model", "mc"])
def test_other_target_sources(tmp_path, eos_policy_dir, tiny_tokenizer, source):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(eos_policy_dir)
    task = CoinTask()
    settings = {"limit": 4, "samples": 6, "chunk_size": 2, "batch_size": 64,
                **({"value_epochs": 1} if source == "value_model" else {"mc_rollouts": 3})}
    out = build_target_dataset(policy, tiny_tokenizer, task, StepSplitter(answer_prefix="Answer:"), tmp_path / source,
                               source, settings, max_new_tokens=8, policy_name="eos", progress=False)
    assert (out / "samples" / "meta.json").exists()
    assert (out / "value_model").is_dir() == (source == "value_model")
    rows = TrajectoryDataset(out).rows
    assert rows and read_meta(out)["targets"]["source"] == source
    for r in rows:
        assert r["finish"] != "length"
        values = r["step_values"]
        # sum_k target_k = (2R - 1) - V(S_0)
        assert sum(r["step_targets"]) == pytest.approx(2 * r["reward"] - 1 - values[0], abs=1e-5)
        if source == "mc":  # 2 * (successes / 3) - 1
            assert all(round((v + 1) * 1.5, 4) == round((v + 1) * 1.5) for v in values)
    assert {r["prompt_index"] for r in rows if r["reward"] > 0} == {r["prompt_index"] for r in rows}
    # a complete folder is reused as is; one built for other settings is refused, naming the key
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    build_target_dataset(policy, tiny_tokenizer, task, StepSplitter(answer_prefix="Answer:"), out, source, settings,
                         max_new_tokens=8, policy_name="eos", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == shards
    with pytest.raises(ValueError, match="max_correct"):
        build_target_dataset(policy, tiny_tokenizer, task, StepSplitter(answer_prefix="Answer:"), out, source,
                             {**settings, "max_correct": 1}, max_new_tokens=8, policy_name="eos", progress=False)


def test_an_interrupted_mcts_build_resumes_from_its_trees(tmp_path, eos_policy_dir, mcts_data):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(mcts_data, copy_dir)
    shard = sorted(copy_dir.glob("shard-*"))[-1]
    expected = shard.read_text()
    shard.unlink()  # the crash came after the chunk's trees were saved, before its shard
    make(eos_policy_dir, copy_dir).build_targets(copy_dir, SMALL_MCTS, policy_name="eos")
    assert shard.read_text() == expected  # re-extracted from the saved trees, same rows


def test_fit_builds_the_targets_on_first_use_with_the_chosen_source(tmp_path, eos_policy_dir):
    data = tmp_path / "data"
    module = make(eos_policy_dir, data, target_source="mc",
                  targets={"limit": 4, "samples": 4, "mc_rollouts": 2, "chunk_size": 4})
    trainer(tmp_path, max_steps=2).fit(module)
    assert read_meta(data)["targets"]["source"] == "mc" and module.data_stats["data/items"] > 0


def test_a_plain_trajectory_dataset_is_refused(tmp_path, eos_policy_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "plain"
    collect((AutoModelForCausalLM.from_pretrained(eos_policy_dir), tiny_tokenizer), CoinTask(), out, samples=2,
            limit=2, max_new_tokens=8, progress=False, policy_name="eos",
            splitter=StepSplitter(answer_prefix="Answer:"))
    module = make(eos_policy_dir, out, targets=None)
    with pytest.raises(ValueError, match="step_targets"):
        module.select_items(module.load_rows())


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    ({"target_source": "prm"}, "target_source"),
    ({"beta": 0.0}, "beta"),
    ({"beta": -1.0}, "beta"),
    ({"targets": {"simulatons": 4}}, "simulatons"),
    ({"target_source": "mc", "targets": {"simulations": 4}}, "simulations"),
    ({"targets": {"width": 0}}, "width"),
    ({"collect": {"samples": 2}}, "targets"),
])
def test_bad_input_names_the_argument(eos_policy_dir, tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(eos_policy_dir, tmp_path, **kwargs)


def test_refresh_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs"):
        MCTSTargetRefresh(every_n_epochs=0)
    with pytest.raises(ValueError, match="simulations"):
        MCTSTargetRefresh(simulations=0)
    assert check_target_settings("mcts", None)["simulations"] == 80  # the paper's budget by default (docs/dvo.md)


# ------------------------------------------------------------------------------- the refresh
def test_refresh_replaces_the_targets_and_survives_a_checkpoint(tmp_path, eos_policy_dir):
    refresh = MCTSTargetRefresh(every_n_epochs=1, simulations=4)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    module = make(eos_policy_dir, tmp_path / "data", targets={**SMALL_MCTS, "limit": 2})
    t = trainer(tmp_path, max_epochs=2, callbacks=[refresh, ckpt], enable_checkpointing=True)
    t.fit(module)
    new = tmp_path / "mcts_refresh" / "refresh1"
    # one refresh: after epoch 1, not after the run's last epoch
    assert refresh.refreshes == 1 and refresh.paths == {1: str(new)} and not (new.parent / "refresh2").exists()
    assert module.data_path == new and t.reload_dataloaders_every_n_epochs == 1
    meta = read_meta(new)
    assert meta["policy"] == f"{eos_policy_dir}@refresh1" and meta["targets"]["simulations"] == 4
    assert meta["sampling"]["seed"] == 1  # refresh k searches with seed + k
    # the epoch-1 checkpoint was written after the switch: it names the new data and the refresh count
    first_file = next((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    first = torch.load(first_file, weights_only=False)
    state = next(v for k, v in first["callbacks"].items() if k.startswith("MCTSTargetRefresh"))
    assert state["refreshes"] == 1 and state["paths"] == {1: str(new)}
    assert first["lit_reason_offline"]["data"] == str(new)
    # resume from it: trains epoch 2 on the refreshed targets, does not search again
    stamp = {p.name: p.stat().st_mtime_ns for p in new.iterdir()}
    resumed = MCTSTargetRefresh(every_n_epochs=1, simulations=4)
    module2 = make(eos_policy_dir, tmp_path / "data", targets={**SMALL_MCTS, "limit": 2})
    trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(module2, ckpt_path=first_file)
    assert resumed.refreshes == 1 and module2.data_path == new
    assert {p.name: p.stat().st_mtime_ns for p in new.iterdir()} == stamp
    with pytest.raises(ValueError, match="every_n_epochs=1"):
        MCTSTargetRefresh(every_n_epochs=2).load_state_dict(state)


def test_with_iterative_rounds_the_search_reruns_at_round_boundaries(tmp_path, eos_policy_dir):
    refresh = MCTSTargetRefresh(every_n_epochs=1, simulations=3)
    rounds = IterativeRounds(rounds=2, epochs_per_round=1)
    module = make(eos_policy_dir, tmp_path / "data", targets={**SMALL_MCTS, "limit": 2})
    trainer(tmp_path, max_epochs=2, callbacks=[rounds, refresh]).fit(module)
    round1 = tmp_path / "rounds" / "round1"
    assert refresh.passive and refresh.refreshes == 0 and not (tmp_path / "mcts_refresh").exists()
    assert module.data_path == round1
    meta = read_meta(round1)  # a search (not a plain collection) with the refresh's budget
    assert meta["targets"] == {**meta["targets"], "source": "mcts", "simulations": 3}
    assert meta["policy"] == f"{eos_policy_dir}@round1"
    assert json.loads((round1 / "meta.json").read_text())["num_prompts"] == 2
