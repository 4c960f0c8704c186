"""Every recipe in recipes/ is loaded and run briefly through the real CLI, so none can drift.

These are end-to-end runs (subprocesses, the real `embedded:arithmetic` start policy, built once
per cache by the SFT recipe), marked slow; CI runs them.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_reason.contracts import HasStateValues, satisfies
from lit_reason.methods.offline import OfflineRL
from lit_reason.methods.online import OnlineRL
from lit_reason.methods.oreo import ValueOfflineRL

REPO = Path(__file__).resolve().parents[1]


def load_recipe(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "recipes" / name).read_text())


# a recipe names its model; a file without one (recipes/fsdp.yaml) is a fragment appended to recipes
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if "model" in load_recipe(p.name))


def recipe_class(name: str) -> type:
    """The LightningModule class a recipe's ``model.class_path`` names."""
    import importlib

    module, _, cls = load_recipe(name)["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


# the groups below follow from each recipe's class, so a new recipe needs no list edits here
ONLINE = {n for n in RECIPES if issubclass(recipe_class(n), OnlineRL)}
OFFLINE = {n for n in RECIPES if issubclass(recipe_class(n), OfflineRL)}
TWO_OPTIMISERS = {n for n in RECIPES if issubclass(recipe_class(n), ValueOfflineRL)}  # max_steps counts both
CALIBRATED = {n for n in RECIPES  # its module's HasStateValues contract: test_recipe_modules_keep_...
              if any(c["class_path"].endswith(".ValueCalibration") for c in load_recipe(n)["trainer"]["callbacks"])}
NO_POLICY_TRAINING = {"dvpo_gvm.yaml"}  # stage 1 of DVPO trains the value model only

# brief: 2 optimiser steps on small iterations; everything else is the recipe as written
BRIEF = {
    "sft.yaml": ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"],
    **{
        name: [
            "--trainer.max_steps", "2",
            "--model.init_args.prompts_per_iteration", "2",
            "--model.init_args.samples_per_prompt", "2",
            "--model.init_args.minibatch_size", "4",
        ]
        for name in ONLINE
    },
    # offline: a small collection (into the test's folder, see data_args) and 2 optimiser steps
    **{
        name: ["--trainer.max_steps", "4" if name in TWO_OPTIMISERS else "2", "--trainer.log_every_n_steps", "1",
               "--model.init_args.batch_size", "4", *(
                   # DVO searches its data (below 12 simulations 8 prompts give no complete path)
                   ["--model.init_args.targets", "{limit: 8, simulations: 12, leaves_per_tree: 4}"] if name == "dvo.yaml"
                   else ["--model.init_args.collect", "{samples: 4, limit: 8, temperature: 0.7}"])]
        for name in OFFLINE
    },
}
BRIEF["dvpo_gvm.yaml"] += ["--model.init_args.holdout_fraction", "0.25", "--trainer.val_check_interval", "1"]
# stage 2 builds a brief stage 1 on first use (cached under a key that includes these overrides)
BRIEF["dvpo.yaml"] += ["--model.init_args.gvm_overrides",
                       '[--trainer.max_steps, "2", --model.init_args.batch_size, "4", --model.init_args.collect, '
                       '"{samples: 2, limit: 8, temperature: 0.7}", --trainer.limit_val_batches, "0"]']


def data_args(name: str, tmp_path: Path) -> list[str]:
    """Offline recipes collect into the test's folder, not the recipe's shared runs/data."""
    return ["--model.init_args.data", str(tmp_path / "data")] if name in OFFLINE else []


def run_cli(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lit_reason", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(root: Path) -> list[dict]:
    files = list(root.rglob("metrics.csv"))
    assert len(files) == 1, f"expected one metrics.csv under {root}, found {files}"
    with open(files[0]) as f:
        return list(csv.DictReader(f))


def test_every_recipe_is_covered():
    assert set(RECIPES) == set(BRIEF), f"recipes without a brief run: {set(RECIPES) ^ set(BRIEF)}"
    assert {"vineppo.yaml", "ppo.yaml", "grpo.yaml", "rloo.yaml", "dvpo.yaml"} <= ONLINE
    assert {"rft.yaml", "dpo.yaml", "oreo.yaml", "dqo.yaml", "dvo.yaml"} <= OFFLINE and not ONLINE & OFFLINE


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_modules_keep_their_callbacks_contracts(name):
    """Each callback a recipe lists checks its contract on the recipe's module class (no model built)."""
    import importlib

    from lit_reason.contracts import missing

    cls = recipe_class(name)
    for spec in load_recipe(name)["trainer"].get("callbacks") or []:
        module, _, cb_name = spec["class_path"].rpartition(".")
        callback = getattr(importlib.import_module(module), cb_name)(**(spec.get("init_args") or {}))
        lacking = missing(cls, getattr(callback, "contract", object))
        assert not lacking, f"{name}: {cls.__name__} lacks {lacking}, which {cb_name} needs"
    if name in CALIBRATED:
        assert satisfies(cls, HasStateValues)


def test_recipes_open_with_the_documented_header():
    for name in RECIPES:
        text = (REPO / "recipes" / name).read_text()
        assert text.startswith("#"), name
        assert f"python -m lit_reason fit --config recipes/{name}" in text, f"{name}: no exact command line"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo.yaml", "rloo.yaml"])
def test_group_recipes_resolve_to_unwhitened_advantages(name, tmp_path):
    # the CLI passes every resolved default explicitly: a default set only inside __init__ (a
    # kwargs.setdefault) lost to OnlineRL's whiten_advantages=True, contrary to the docstring
    import yaml

    proc = run_cli(["fit", "--config", f"recipes/{name}", "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--print_config"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(proc.stdout)["model"]["init_args"]["whiten_advantages"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_briefly(name, tmp_path, embedded_arithmetic):
    root = tmp_path / "run"
    proc = run_cli(["fit", "--config", f"recipes/{name}", "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", *BRIEF[name], *data_args(name, tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(root)
    keys = {k for r in rows for k, v in r.items() if v != ""}
    evals = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    if name in NO_POLICY_TRAINING:
        assert {"gvm/val_loss", "gvm/pairs"} <= keys
    else:
        assert len(evals) >= 2, "val/accuracy is logged before training and at the end"
        assert all(0.0 <= a <= 1.0 for a in evals)
    assert list(root.rglob("config.yaml")), "the resolved config is saved in the run folder"
    if name in ONLINE:
        assert {"train/reward", "train/pg_loss", "train/kl"} <= keys
    if name in OFFLINE:
        assert {"train/loss", "data/rows", "data/items"} <= keys
        assert (tmp_path / "data" / "meta.json").exists(), "collected on first use"
    if name in CALIBRATED:
        assert {"value/mae_vs_mc", "value/ece", "value/brier", "value/explained_var"} <= keys
        pngs = list(root.rglob("reliability_step*.png"))
        assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_value_calibration_on_a_value_less_module_fails_clearly(tmp_path):
    # SFT has no value estimate: appending the calibration fragment must name what is missing
    proc = run_cli(["fit", "--config", "recipes/sft.yaml", "--config", "callbacks/value_calibration.yaml",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1",
                    "--model.init_args.tiny", "{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"],
                   tmp_path)
    assert proc.returncode != 0
    assert "state_values" in proc.stderr and "SFT" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("subcommand,name,key", [("validate", "grpo.yaml", "val/accuracy"),
                                                  ("test", "vineppo.yaml", "test/accuracy"),
                                                  ("test", "sft.yaml", "test/loss")])
def test_validate_and_test_subcommands(subcommand, name, key, tmp_path, embedded_arithmetic):
    root = tmp_path / "run"
    extra = ["--model.init_args.eval_limit", "16"]  # one name for every method (SFT: examples of val/loss)
    proc = run_cli([subcommand, "--config", f"recipes/{name}", "--trainer.default_root_dir", str(root), *extra],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(root)
    values = [float(r[key]) for r in rows if r.get(key)]
    assert len(values) == 1
    assert values[0] >= 0.0


FRAGMENTS = sorted(p.name for p in (REPO / "callbacks").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_callback_fragments_append(fragment, tmp_path):
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "grpo.yaml").read_text())
    proc = run_cli(["fit", "--config", "recipes/grpo.yaml", "--config", f"callbacks/{fragment}",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--print_config"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    callbacks = printed["trainer"]["callbacks"]
    assert len(callbacks) == len(recipe["trainer"]["callbacks"]) + 1  # appended, not replaced
    added = yaml.safe_load((REPO / "callbacks" / fragment).read_text())["trainer"]["callbacks+"][0]
    assert callbacks[-1]["class_path"] == added["class_path"]
    assert "${" not in proc.stdout  # interpolations resolved after the merge
