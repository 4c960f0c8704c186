"""ValueCalibration end to end: a real tiny Llama, real rollouts, real Lightning fits.

No model is mocked. Three things make the metrics meaningful on a model that was never trained:

* An untrained model almost never emits EOS, so every rollout would be truncated (reward 0) and
  every Monte Carlo value 0. The test model is the tiny Llama with its EOS row of the (tied)
  embedding scaled up (``EOS_BOOST``): its EOS logit then swings widely with the context, so
  responses end after a few tokens and get graded.
* ``MixedTask`` (the arithmetic task with another grader) fixes how a prompt's outcome is decided:
  by the prompt alone for two thirds of the prompts (value ~1 when the gold answer is 0 mod 3,
  exactly 0 when it is 1 mod 3), by the sampled text for the rest (a coin flip on the parity of the
  response length: values near 0.5, and sibling next steps with different values, i.e. pairs for
  the ranking test). So the MC ground truth has real variance across states that an oracle can
  explain and a constant cannot.
* The modules' StepSplitter uses a space as the step delimiter (a ``custom`` policy), so these short
  responses still have several steps: probe states with non-empty partial responses, and
  alternative next steps cut at the module's own delimiter.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from lit_reason.callbacks import ValueCalibration
from lit_reason.models.tiny import build_tiny_model
from lit_reason.rollout.monte_carlo import mc_values
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.steps import StepSplitter
from lit_reason.tasks.arithmetic import ArithmeticTask

EOS_BOOST = 16.0
MAX_NEW = 40
PROBE = 6
MC = 4
ORACLE_MC = 32
KEYS = ("value/mae_vs_mc", "value/ece", "value/brier", "value/explained_var")


class MixedTask(ArithmeticTask):
    """Gold answer 0 mod 3: always right; 1 mod 3: always wrong; 2 mod 3: right iff len(text) is even."""

    def reward(self, response: str, example: dict) -> float:
        cls = int(example["answer"]) % 3
        return 1.0 if cls == 0 else 0.0 if cls == 1 else float(len(response) % 2 == 0)


def make_task(**kwargs) -> MixedTask:
    # seed 3: the first 6 validation answers are 1,1,2,2,0,1 mod 3 (asserted in test_probe_task)
    return MixedTask(**{"seed": 3, "n_train": 200, "n_validation": 50, "n_test": 50, **kwargs})


class ProbeModule(pl.LightningModule):
    """Implements the calibration protocol around a tiny causal LM; trains it with a tiny SFT loss."""

    def __init__(self, policy, tokenizer, task):
        super().__init__()
        self.policy, self.tokenizer, self.task = policy, tokenizer, task
        self.splitter = StepSplitter(delimiter=" ")

    def train_dataloader(self):
        rows = []
        for ex in self.task.examples("train")[:4]:
            prompt = self.tokenizer(self.task.prompt(ex), add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(self.task.reference_solution(ex), add_special_tokens=False)["input_ids"]
            rows.append((prompt, answer + [self.tokenizer.eos_token_id]))
        return DataLoader(rows, batch_size=2, collate_fn=self._collate)

    def _collate(self, rows):
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            labels[i, len(p) : n] = torch.tensor(r)
            mask[i, :n] = 1
        return ids, mask, labels

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        return self.policy(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=1e-4)


class OracleModule(ProbeModule):
    """Predicts each state's value by its own Monte Carlo estimate (independent seed, 8x the rollouts)."""

    value_range = (-1.0, 1.0)  # predicts on the signed scale, to exercise the affine map

    def state_values(self, prompt_ids, partial_ids, examples):
        assert not self.training and not torch.is_grad_enabled()
        engine = RolloutEngine(self.policy, self.tokenizer, max_new_tokens=MAX_NEW, seed=12345)
        v = mc_values(engine, self.task, prompt_ids, partial_ids, examples, k=ORACLE_MC)
        return 2.0 * v - 1.0


class ConstantModule(ProbeModule):
    """Predicts -0.5 on the signed scale, i.e. probability 0.25, for every state."""

    value_range = (-1.0, 1.0)

    def state_values(self, prompt_ids, partial_ids, examples):
        return torch.full((len(prompt_ids),), -0.5)


class NoValueModule(ProbeModule):
    """A method without a value: the callback must refuse it."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on shared CPU cores two threads make these tiny ops ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stopping_model(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the row scales the EOS logit
    with torch.no_grad():
        model.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= EOS_BOOST
    return model


def callback(**kwargs) -> ValueCalibration:
    args = dict(probe_size=PROBE, mc_rollouts=MC, rank_states=8, rank_alternatives=4, max_new_tokens=MAX_NEW,
                batch_size=64, progress=False)
    return ValueCalibration(**{**args, **kwargs})


def fit(module, cb, root: Path, wandb: bool = False, max_steps: int = 2) -> pl.Trainer:
    loggers = [CSVLogger(root, name="csv")]
    if wandb:
        loggers.append(WandbLogger(save_dir=root, offline=True, project="lit_reason_test"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=loggers, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, log_every_n_steps=1)
    try:
        trainer.fit(module)
    finally:
        if wandb:
            import wandb as wandb_lib

            wandb_lib.finish()
    return trainer


def csv_rows(trainer) -> list[dict]:
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def runs(stopping_model, tiny_tokenizer, tmp_path_factory):
    """An oracle and a constant module calibrated from the same start (same probe states and MC truth)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = {}
    for name, cls, kwargs in (("oracle", OracleModule, {}), ("constant", ConstantModule, {"at_end": False})):
        root = tmp_path_factory.mktemp(name)
        cb = callback(**kwargs)
        module = cls(copy.deepcopy(stopping_model), tiny_tokenizer, make_task())
        trainer = fit(module, cb, root, wandb=name == "oracle")
        out[name] = (cb, trainer, root)
    return out


def test_probe_task():
    classes = [int(e["answer"]) % 3 for e in make_task().examples("validation")[:PROBE]]
    assert set(classes) == {0, 1, 2}, classes  # deterministic, coin-flip and value-1 prompts all present


def test_oracle_beats_constant(runs):
    oracle_cb, _, oracle_root = runs["oracle"]
    const_cb, _, const_root = runs["constant"]
    assert [s for s, _ in oracle_cb.history] == [0, 2] and [s for s, _ in const_cb.history] == [0]
    o, c = oracle_cb.history[0][1], const_cb.history[0][1]
    # same fixed probe states and the same MC ground truth at step 0 (same seeds, same weights)
    assert oracle_cb.states == const_cb.states and o["value/count"] == c["value/count"] == len(oracle_cb.states)
    assert {s.example_index for s in oracle_cb.states} == set(range(PROBE))
    assert max(s.step_index for s in oracle_cb.states) >= 1  # partial responses are exercised too
    rel = {n: json.loads((r / "csv" / "version_0" / "calibration" / "reliability_step000000.json").read_text())
           for n, r in (("o", oracle_root), ("c", const_root))}
    mean_mc = {n: sum(r["count"] * r["mean_mc"] for r in j["reliability"] if r["count"])
               / sum(r["count"] for r in j["reliability"]) for n, j in rel.items()}
    assert mean_mc["o"] == pytest.approx(mean_mc["c"], abs=1e-12)
    assert 0.1 < mean_mc["c"] < 0.9  # the truth is neither all 0 nor all 1

    # the signed scale is mapped onto [0, 1]: -0.5 -> 0.25, not clipped to 0
    assert c["value/clip_fraction"] == 0.0 and o["value/clip_fraction"] == 0.0
    assert c["value/ece_vs_mc"] == pytest.approx(abs(0.25 - mean_mc["c"]), abs=1e-9)
    # a constant explains none of the variance; the oracle most of it, with a much smaller error
    assert abs(c["value/explained_var"]) < 1e-9
    assert o["value/explained_var"] > 0.5, o
    assert o["value/mae_vs_mc"] < 0.15 and o["value/mae_vs_mc"] < c["value/mae_vs_mc"] - 0.1, (o, c)
    assert o["value/brier_vs_mc"] < c["value/brier_vs_mc"]
    for m in (o, c):
        for k in ("value/ece", "value/ece_vs_mc", "value/brier", "value/brier_vs_mc"):
            assert 0.0 <= m[k] <= 1.0 and math.isfinite(m[k])


def test_rank_accuracy(runs):
    o = runs["oracle"][0].history[0][1]
    c = runs["constant"][0].history[0][1]
    # same sampled alternatives and the same truth in both runs, so the same informative pairs
    assert o["value/rank_pairs"] == c["value/rank_pairs"] > 0
    assert 0.0 <= o["value/rank_acc"] <= 1.0
    assert c["value/rank_acc"] == 0.5  # constant predictions tie every pair: chance, exactly
    assert o["value/rank_acc"] >= 0.75, o  # terminal alternatives are graded exactly


def test_metrics_logged_and_files_written(runs):
    cb, trainer, root = runs["oracle"]
    rows = csv_rows(trainer)
    for key in (*KEYS, "value/rank_pairs", "value/count"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key  # start and end
    run_dir = Path(trainer.log_dir)
    for step in (0, 2):
        png = run_dir / "calibration" / f"reliability_step{step:06d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        payload = json.loads(png.with_suffix(".json").read_text())
        assert payload["global_step"] == step and len(payload["reliability"]) == 10
        assert sum(r["count"] for r in payload["reliability"]) == payload["metrics"]["value/count"]
        assert {"0", "1"} <= set(payload["mae_by_step"])
    media = list(root.glob("wandb/offline-run-*/files/media/images/value/reliability_*.png"))
    tables = list(root.glob("wandb/offline-run-*/files/media/table/value/reliability_table_*.table.json"))
    assert len(media) == 2 and len(tables) == 2, (media, tables)
    assert trainer.callback_metrics["value/mae_vs_mc"] == pytest.approx(cb.history[-1][1]["value/mae_vs_mc"])


def test_module_without_state_values_is_refused(stopping_model, tiny_tokenizer, tmp_path):
    module = NoValueModule(copy.deepcopy(stopping_model), tiny_tokenizer, make_task())
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[callback()],
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(AttributeError, match=r"NoValueModule has no `state_values`"):
        trainer.fit(module)


class CountingCalibration(ValueCalibration):
    """Counts how often the probe set is sampled."""

    builds = 0

    def build_states(self, pl_module):
        self.builds += 1
        return super().build_states(pl_module)


def test_state_dict_resume_keeps_probe_states(runs, stopping_model, tiny_tokenizer, tmp_path):
    first, first_trainer, _ = runs["oracle"]
    # plain round trip, through the safe (weights_only) loader
    torch.save(first.state_dict(), tmp_path / "cb.pt")
    restored = callback()
    restored.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
    assert restored.states == first.states and restored.history == first.history and len(first.states) >= PROBE

    # a real resume: Lightning restores the callback from the checkpoint before fit start
    ckpt = tmp_path / "last.ckpt"
    first_trainer.save_checkpoint(ckpt)
    args = dict(probe_size=PROBE, mc_rollouts=MC, rank_states=0, max_new_tokens=MAX_NEW, progress=False)
    resumed = CountingCalibration(**args, every_n_steps=1)
    module = ConstantModule(copy.deepcopy(stopping_model), tiny_tokenizer, make_task())
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path, name="csv"), callbacks=[resumed],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(module, ckpt_path=ckpt)
    assert resumed.builds == 0 and resumed.states == first.states  # not resampled
    # step 2 was calibrated before the checkpoint: no repeat at fit start; then every step; no
    # second calibration at the end (step 4 is done)
    assert [s for s, _ in resumed.history] == [0, 2, 3, 4]
    assert [float(r["value/count"]) for r in csv_rows(trainer) if r.get("value/count")] == [len(first.states)] * 2

    # a fresh callback on the same module does sample its probe set
    fresh = CountingCalibration(**args, at_start=False, at_end=False, every_n_steps=1)
    fresh_module = ConstantModule(copy.deepcopy(stopping_model), tiny_tokenizer, make_task())
    fit(fresh_module, fresh, tmp_path / "fresh", max_steps=1)
    assert fresh.builds == 1 and [s for s, _ in fresh.history] == [1]


def test_no_state_logs_a_skip(stopping_model, tiny_tokenizer, tmp_path):
    module = ConstantModule(copy.deepcopy(stopping_model), tiny_tokenizer, make_task(n_validation=0))
    cb = callback(at_end=False)
    with pytest.warns(UserWarning, match="ValueCalibration skipped at step 0: no probe state"):
        trainer = fit(module, cb, tmp_path, max_steps=1)
    assert cb.history == [(0, {"value/skipped": 1.0})]
    logged = {k for r in csv_rows(trainer) for k, v in r.items() if v and k.startswith("value/")}
    assert logged == {"value/skipped"}
    assert not (Path(trainer.log_dir) / "calibration").exists()


@pytest.mark.slow
def test_ddp_shards_and_reduces(runs, stopping_model, tiny_tokenizer, tmp_path):
    """Two CPU processes (gloo): rank 0 samples the probe set, each rank scores half, sums are reduced."""
    module = ConstantModule(copy.deepcopy(stopping_model), tiny_tokenizer, make_task())
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1,
                         logger=CSVLogger(tmp_path, name="csv", version=0), callbacks=[callback(at_end=False)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(module)
    # the parent process re-creates the CSV writer (dropping metrics.csv); rank 0's JSON holds the metrics
    payload = json.loads((tmp_path / "csv" / "version_0" / "calibration" / "reliability_step000000.json").read_text())
    metrics = payload["metrics"]
    # the same probe set as the single-process run (same seed, same start), all of it scored
    assert payload["probe"]["states"] == metrics["value/count"] == len(runs["constant"][0].states)
    assert metrics["value/explained_var"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["value/rank_pairs"] > 0 and metrics["value/rank_acc"] == 0.5
