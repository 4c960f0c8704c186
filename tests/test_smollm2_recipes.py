"""Every recipe in recipes/smollm2/ runs briefly through the real CLI on the real SmolLM2-135M-Instruct
(LoRA, chat prompts): 4 validation prompts, one or two optimiser steps. tests/test_recipes.py covers
the top-level recipes/*.yaml only."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_smollm2 import gguf_file_or_skip

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "recipes" / "smollm2").glob("*.yaml"))
# the recipes' task, with 4 validation prompts, so the start and end evaluations are brief
SMALL_TASK = "{name: arithmetic, num_operands: 3, n_train: 64, n_validation: 4, n_test: 4, prompt_format: chat}"
ONLINE_BRIEF = ["--trainer.max_steps", "1", "--model.init_args.prompts_per_iteration", "2",
                "--model.init_args.samples_per_prompt", "2", "--model.init_args.minibatch_size", "4",
                "--model.init_args.epochs_per_iteration", "1"]


def brief_args(name: str, tmp_path: Path) -> list[str]:
    model = yaml.safe_load((REPO / "recipes" / "smollm2" / name).read_text())["model"]["init_args"]
    if "collect" in model:  # offline: a tiny collection into the test's folder, one batch (2 optimiser steps)
        return ["--trainer.max_steps", "2", "--model.init_args.batch_size", "4", "--model.init_args.data",
                str(tmp_path / "data"), "--model.init_args.collect", "{samples: 2, limit: 2, temperature: 0.7}"]
    return ONLINE_BRIEF


def test_smollm2_recipes_exist_and_open_with_their_header():
    assert {"grpo.yaml", "vineppo.yaml", "oreo.yaml"} <= set(RECIPES)
    for name in RECIPES:
        text = (REPO / "recipes" / "smollm2" / name).read_text()
        assert text.startswith("#") and "Time:" in text, name
        assert f"python -m lit_reason fit --config recipes/smollm2/{name}" in text, name
        model = yaml.safe_load(text)["model"]["init_args"]
        assert model["policy"] == "smollm2:135m-instruct" and model["lora"], name
        assert model["task"]["prompt_format"] == "chat", name


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_smollm2_recipe_runs_briefly(name, tmp_path):
    gguf_file_or_skip()
    root = tmp_path / "run"
    args = ["fit", "--config", f"recipes/smollm2/{name}", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.init_args.task", SMALL_TASK, *brief_args(name, tmp_path)]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "lit_reason", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics,) = root.rglob("metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    evals = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert len(evals) >= 2 and all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in evals)  # 4 prompts, start and end
    keys = {k for r in rows for k, v in r.items() if v != ""}
    assert "train/loss" in keys or "train/pg_loss" in keys
