"""IterativeRounds: re-collection between rounds, the dataloader switch, logging, checkpoint resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from lit_reason.callbacks.rounds import IterativeRounds, RoundSchedule
from lit_reason.data.trajectories import TrajectoryDataset, read_meta
from lit_reason.methods.rft import RFT
from lit_reason.models.logprobs import response_logprobs

REPO = Path(__file__).resolve().parents[1]
COLLECT = {"samples": 2, "limit": 8, "chunk_size": 4}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class AllRowsRFT(RFT):
    """RFT fine-tuning on every sampled row, and counting its re-collections.

    The tiny random policy almost never answers right, so real RFT would have no item; which rows
    a method keeps is no concern of the round callback, whose mechanics are what is tested here.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recollected: list[int] = []

    def select_items(self, rows: list[dict]) -> list[dict]:
        return list(rows)

    def recollect(self, output, seed, round_index):
        self.recollected.append(round_index)
        return super().recollect(output, seed, round_index)


class Killed(Exception):
    """Stands for a run killed at the start of an epoch."""


class Probe(pl.Callback):
    """Records, per epoch, the rows the train dataloader actually serves and the weights at its end."""

    def __init__(self, kill_at_epoch: int | None = None) -> None:
        self.kill_at_epoch = kill_at_epoch
        self.served: dict[int, set] = {}
        self.data_path: dict[int, str] = {}
        self.weights: dict[int, dict] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.kill_at_epoch:
            raise Killed(f"killed at the start of epoch {trainer.current_epoch}")
        self.served[trainer.current_epoch] = {row_key(r) for r in trainer.train_dataloader.dataset}
        self.data_path[trainer.current_epoch] = str(pl_module.data_path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # listed before IterativeRounds: the weights that collect the next round's data
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def row_key(row: dict) -> tuple:
    return row["prompt_index"], row["sample_index"], tuple(row["response_ids"])


def dataset_keys(path: Path) -> set:
    return {row_key(r) for r in TrajectoryDataset(path)}


def make_module(policy_dir: str, tmp_path: Path) -> AllRowsRFT:
    return AllRowsRFT(policy=policy_dir, task="arithmetic", data=str(tmp_path / "data"), collect=dict(COLLECT),
                      batch_size=8, lr=1e-3, warmup_steps=0, max_new_tokens=16, rollout_batch_size=16,
                      progress=False)


def make_trainer(root: Path, callbacks: list, max_epochs: int = 3, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", CSVLogger(root, name="csv"))
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=root, callbacks=callbacks,
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def read_metrics(root: Path) -> list[dict]:
    files = sorted(root.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def behaviour_logprob_gap(policy_dir: str, weights: dict | None, path: Path) -> float:
    """Max |stored behaviour log-prob - log-prob under the given weights| over a dataset's responses."""
    from lit_reason.models.loading import load_policy

    model, tok = load_policy(policy_dir)
    if weights is not None:
        model.load_state_dict(weights)
    model.eval()
    b = TrajectoryDataset.to_batch(TrajectoryDataset(path).rows, tok.pad_token_id)
    with torch.no_grad():
        logp = response_logprobs(model, b.input_ids, b.attention_mask, b.prompt_len)
    return float(((logp - b.old_logprobs).abs() * b.response_mask).max())


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, "rounds must be"), ({"rounds": 2.5}, "rounds must be"), ({"epochs_per_round": 0}, "epochs_per_round"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IterativeRounds(**kwargs)


def test_epochs_must_match_rounds(tiny_policy_dir, tmp_path):
    module = make_module(tiny_policy_dir, tmp_path)
    trainer = make_trainer(tmp_path, [IterativeRounds(rounds=3, epochs_per_round=2)], max_epochs=3, logger=False)
    with pytest.raises(ValueError, match=r"trainer.max_epochs=6, got 3"):
        trainer.fit(module)
    assert not (tmp_path / "data").exists(), "the check runs before the round-0 collection"


def test_module_without_recollect_is_named(tmp_path):
    trainer = make_trainer(tmp_path, [IterativeRounds(rounds=2)], max_epochs=2, logger=False)
    with pytest.raises(TypeError, match="BoringModel has no `use_dataset`, `recollect`"):
        trainer.fit(BoringModel())


class OtherRounds(RoundSchedule):
    """Another round callback (as DVO's MCTSTargetRefresh would be); Lightning itself refuses two of one type."""

    def check_module(self, pl_module) -> None:
        pass


def test_one_schedule_per_run(tmp_path):
    trainer = make_trainer(tmp_path, [OtherRounds(rounds=2), IterativeRounds(rounds=2)], max_epochs=2, logger=False)
    with pytest.raises(ValueError, match="one round schedule per run"):
        trainer.fit(BoringModel())


def test_resume_refuses_another_epochs_per_round():
    state = IterativeRounds(rounds=2, epochs_per_round=2).state_dict()
    with pytest.raises(ValueError, match="epochs_per_round=2"):
        IterativeRounds(rounds=2, epochs_per_round=1).load_state_dict(state)
    resumed = IterativeRounds(rounds=4, epochs_per_round=2)  # more rounds: a longer run, allowed
    resumed.load_state_dict({**state, "round": 1, "paths": {"1": "/x/round1"}})
    assert resumed.round == 1 and resumed.paths == {1: "/x/round1"}


def test_build_round_is_the_subclass_hook():
    assert issubclass(IterativeRounds, RoundSchedule)
    with pytest.raises(NotImplementedError):
        RoundSchedule().build_round(None, None, 1, Path("x"))


# ------------------------------------------------------------------------------------ rounds


def test_three_rounds_recollect_with_the_current_policy(tiny_policy_dir, tmp_path):
    root = tmp_path / "run"
    probe = Probe()
    rounds = IterativeRounds(rounds=3, epochs_per_round=1, seed=5)
    module = make_module(tiny_policy_dir, tmp_path)
    make_trainer(root, [probe, rounds]).fit(module)

    paths = [tmp_path / "data", root / "rounds" / "round1", root / "rounds" / "round2"]
    assert not (root / "rounds" / "round3").exists(), "no collection after the last round"
    assert module.recollected == [1, 2]
    for k in (1, 2):
        meta = read_meta(paths[k])
        assert meta["policy"] == f"{tiny_policy_dir}@round{k}"
        assert meta["sampling"]["seed"] == 5 + k and meta["sampling"]["samples"] == 2 and meta["num_prompts"] == 8
    # each epoch's dataloader served exactly its round's dataset: Lightning did rebuild it
    for epoch, path in enumerate(paths):
        assert probe.data_path[epoch] == str(path)
        assert probe.served[epoch] == dataset_keys(path), f"epoch {epoch} did not train on {path}"
    assert probe.served[0] != probe.served[1] != probe.served[2]
    # round k's behaviour log-probs are those of the weights at the end of epoch k-1, not the start policy's
    assert behaviour_logprob_gap(tiny_policy_dir, probe.weights[0], paths[1]) < 1e-4
    assert behaviour_logprob_gap(tiny_policy_dir, probe.weights[1], paths[2]) < 1e-4
    assert behaviour_logprob_gap(tiny_policy_dir, None, paths[1]) > 1e-3

    assert rounds.round == 2 and rounds.paths == {k: str(p) for k, p in enumerate(paths)}
    metrics = read_metrics(root)
    assert logged(metrics, "rounds/round") == [0.0, 1.0, 2.0]
    fractions = logged(metrics, "rounds/positive_fraction")
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)
    assert logged(metrics, "rounds/rows") == [float(len(TrajectoryDataset(p))) for p in paths[1:]]


def test_resume_continues_on_the_checkpointed_round(tiny_policy_dir, tmp_path):
    root = tmp_path / "run"
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    killed_module = make_module(tiny_policy_dir, tmp_path)
    trainer = make_trainer(root, [Probe(kill_at_epoch=1), IterativeRounds(rounds=3), checkpoint],
                           enable_checkpointing=True, logger=False)
    with pytest.raises(Killed):
        trainer.fit(killed_module)
    round1 = root / "rounds" / "round1"
    assert killed_module.recollected == [1] and not (root / "rounds" / "round2").exists()
    ckpt = ckpt_dir / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["callbacks"]["IterativeRounds"]["round"] == 1, "the switch precedes the epoch's checkpoint"
    stamps = {p.name: p.stat().st_mtime_ns for p in round1.iterdir()}

    probe = Probe()
    rounds = IterativeRounds(rounds=3)
    module = make_module(tiny_policy_dir, tmp_path)
    make_trainer(root, [probe, rounds], logger=CSVLogger(tmp_path / "resumed", name="csv")).fit(module, ckpt_path=ckpt)
    assert module.recollected == [2], "round 1 was not collected again"
    assert {p.name: p.stat().st_mtime_ns for p in round1.iterdir()} == stamps
    assert sorted(probe.served) == [1, 2]
    assert probe.served[1] == dataset_keys(round1) and probe.data_path[1] == str(round1)
    assert probe.served[2] == dataset_keys(root / "rounds" / "round2")
    assert rounds.round == 2 and set(rounds.paths) == {0, 1, 2}
    # round 1 was logged at its switch, before the checkpoint (the killed run's rows, which an exact
    # resume keeps); the resumed fit logs only what the uninterrupted run logs after it: the switch to 2
    assert logged(read_metrics(tmp_path / "resumed"), "rounds/round") == [2.0]


# --------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_fragment_runs_with_the_rft_recipe(tmp_path, embedded_arithmetic):
    root = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lit_reason", "fit", "--config", "recipes/rft.yaml",
         "--config", "callbacks/iterative_rounds.yaml", "--trainer.default_root_dir", str(root),
         "--trainer.enable_progress_bar", "false", "--model.init_args.data", str(tmp_path / "data"),
         "--model.init_args.collect", "{samples: 4, limit: 16, temperature: 1.0}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for k in (1, 2):
        assert read_meta(root / "rounds" / f"round{k}")["policy"].endswith(f"@round{k}")
    assert logged(read_metrics(root), "rounds/round") == [0.0, 1.0, 2.0]
