"""Sweep configs run the same CLI: every swept key must be a valid override of the named recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_shape(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"][:4] == ["python", "-m", "lit_reason", "fit"]
    assert sweep["command"][-1] == "${args}"
    assert sweep["metric"]["name"] == "val/accuracy"
    recipe = sweep["command"][sweep["command"].index("--config") + 1]
    assert (REPO / recipe).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_valid_overrides(path):
    sweep = yaml.safe_load(path.read_text())
    # what the W&B agent would pass: --key=value with the first value of each parameter
    args = [f"--{k}={spec['values'][0]}" for k, spec in sweep["parameters"].items()]
    cmd = [sys.executable, *sweep["command"][1:-1], *args, "--print_config"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    for key, spec in sweep["parameters"].items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert float(node) == float(spec["values"][0]), key


# settings that make a VinePPO trial take seconds: 2 optimiser steps, 8 evaluation prompts, CSV only
SMALL_TRIAL = """\
trainer:
  max_steps: 2
  enable_progress_bar: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: "${trainer.default_root_dir}", name: csv}
  callbacks:
    - class_path: lit_reason.callbacks.EvalAccuracy
      init_args: {split: validation, limit: 8, max_new_tokens: 40}
model:
  init_args:
    task: {name: arithmetic, n_train: 64, n_validation: 8, n_test: 8}
    prompts_per_iteration: 2
    minibatch_size: 8
    epochs_per_iteration: 1
    max_new_tokens: 40
    progress: false
"""


@pytest.mark.slow
def test_offline_sweep_runs_three_trials_and_names_the_best(tmp_path, embedded_arithmetic):
    import json

    fragment = tmp_path / "small.yaml"
    fragment.write_text(SMALL_TRIAL)
    cmd = [sys.executable, "-m", "lit_reason", "sweep", "sweeps/vineppo.yaml", "--count", "3",
           "--root", str(tmp_path / "sweeps"), "--", "--config", str(fragment)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "sweeps").iterdir()
    record = json.loads((folder / "sweep.json").read_text())
    trials = record["trials"]
    assert len(trials) == 3 and all(t["state"] == "finished" for t in trials)
    sweep = yaml.safe_load((REPO / "sweeps/vineppo.yaml").read_text())
    for t in trials:
        # each trial is an ordinary fit with the proposed overrides, in its own folder
        assert set(t["params"]) == set(sweep["parameters"])
        for key, value in t["params"].items():
            assert value in sweep["parameters"][key]["values"]
        (saved,) = Path(t["folder"]).glob("csv/version_*/config.yaml")
        config = yaml.safe_load(saved.read_text())
        assert config["model"]["init_args"]["mc_rollouts"] == t["params"]["model.init_args.mc_rollouts"]
        assert 0.0 <= t["metric"] <= 1.0
    best = max(trials, key=lambda t: t["metric"])
    table = proc.stdout[proc.stdout.index("| trial"):]
    assert table.count("\n| ") == 1 + 3  # separator line + one row per trial
    assert f"best: trial {best['trial']} (val/accuracy {best['metric']:.4f}, maximize)" in table


def test_sweep_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: random\nmetric: {name: val/accuracy}\nparameters: {}\ncommand: [python, -m, lit_reason, fit]\n")
    proc = subprocess.run([sys.executable, "-m", "lit_reason", "sweep", str(bad), "--count", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "${args}" in proc.stderr
