"""End-to-end tests of ``python -m lit_reason`` (fit through LightningCLI, and ``evaluate``).

Every test runs the CLI in a subprocess from the repository root, as a user would. One small SFT
fit is shared by the module: it exercises config merging (a second ``--config`` appending a
callback), interpolation resolved after a command-line override, the saved config, the CSV logs
and the exported policy that the ``evaluate`` tests then load.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_step_config

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

RECIPE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  log_every_n_steps: 1
  default_root_dir: {root}
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: "${{trainer.default_root_dir}}", name: csv}}
  callbacks:
    - class_path: lit_reason.callbacks.EvalAccuracy
      init_args: {{split: validation, limit: 4, max_new_tokens: 8}}
model:
  class_path: lit_reason.methods.SFT
  init_args:
    policy: embedded:tiny
    task: {{name: arithmetic, n_train: 128, n_validation: 16, n_test: 16}}
    batch_size: 16
    eval_limit: 16
    warmup_steps: 1
    tiny: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
"""

EXPORT_FRAGMENT = """\
trainer:
  callbacks+:
    - class_path: lit_reason.callbacks.ExportPolicy
      init_args: {{dirpath: {export}}}
"""


def run_cli(args: list[str], cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # one torch thread: tiny models gain nothing from two, and lose a lot on busy shared cores
    env.update({"LIT_REASON_CACHE": str(cache), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "lit_reason", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(folder: Path, root: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(root=root))
    return path


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """Runs ``fit`` once: recipe + export fragment + a ``--trainer.default_root_dir`` override."""
    tmp = tmp_path_factory.mktemp("cli_fit")
    recipe_root, root, export = tmp / "recipe_root", tmp / "override_root", tmp / "export"
    recipe = write_recipe(tmp, recipe_root)
    fragment = tmp / "export.yaml"
    fragment.write_text(EXPORT_FRAGMENT.format(export=export))
    proc = run_cli(["fit", "--config", str(recipe), "--config", str(fragment),
                    "--trainer.default_root_dir", str(root)], cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "recipe": recipe, "recipe_root": recipe_root, "root": root, "export": export, "proc": proc}


def test_fit_writes_logs_config_and_both_callbacks_run(fit_run):
    root = fit_run["root"]
    # the command-line root wins, and the logger's ${trainer.default_root_dir} followed it
    assert not fit_run["recipe_root"].exists()
    metrics = list(root.glob("csv/version_*/metrics.csv"))
    assert len(metrics) == 1
    with metrics[0].open() as f:
        rows = list(csv.DictReader(f))
    # EvalAccuracy (from the recipe) logged at fit start and end ...
    accuracy = [r["val/accuracy"] for r in rows if r.get("val/accuracy")]
    assert len(accuracy) >= 2 and all(0.0 <= float(a) <= 1.0 for a in accuracy)
    assert any(r.get("train/loss") for r in rows)
    # ... and ExportPolicy (appended by the fragment) wrote a loadable folder
    export = fit_run["export"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (export / name).is_file(), name
    assert json.loads((export / "config.json").read_text())["hidden_size"] == 32
    assert not any(p.name.startswith(".") for p in export.parent.iterdir())  # no temp folders left


def test_fit_saves_resolved_config(fit_run):
    import yaml

    saved = list(fit_run["root"].glob("csv/version_*/config.yaml"))
    assert len(saved) == 1
    text = saved[0].read_text()
    assert "${" not in text
    config = yaml.safe_load(text)
    trainer = config["trainer"]
    assert trainer["default_root_dir"] == str(fit_run["root"])
    assert trainer["logger"][0]["init_args"]["save_dir"] == str(fit_run["root"])
    assert [c["class_path"] for c in trainer["callbacks"]] == [
        "lit_reason.callbacks.EvalAccuracy", "lit_reason.callbacks.ExportPolicy"]
    assert config["model"]["class_path"] == "lit_reason.methods.SFT"
    assert config["model"]["init_args"]["tiny"]["hidden_size"] == 32


def test_fit_emits_no_args_warning(fit_run):
    # `python -m lit_reason` lets LightningCLI read sys.argv itself (no "both args and command line")
    assert "not recommended to provide both args" not in fit_run["proc"].stderr


def test_print_config(tmp_path):
    root = tmp_path / "root"
    recipe = write_recipe(tmp_path, root)
    proc = run_cli(["fit", "--config", str(recipe), "--print_config"], cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_path: lit_reason.methods.SFT" in proc.stdout
    assert "lit_reason.callbacks.EvalAccuracy" in proc.stdout
    assert f"save_dir: {root}" in proc.stdout and "${" not in proc.stdout
    assert not root.exists()  # printing the config trains nothing


def test_config_typo_names_the_key(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "root")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    lrr: 1\n")
    proc = run_cli(["fit", "--config", str(recipe), "--config", str(typo)], cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert "lrr" in proc.stderr
    assert not (tmp_path / "root").exists()


def test_evaluate_writes_table_and_json(fit_run, tmp_path):
    # one run covers the greedy table/JSON and the sampled metrics (--samples adds pass@1_mean and
    # majority; their absence without --samples is checked in-process in test_evaluation.py)
    out = tmp_path / "out.json"
    proc = run_cli(["evaluate", "--policy", str(fit_run["export"]), "--task", "arithmetic", "--limit", "5",
                    "--max-new-tokens", "12", "--samples", "2", "--temperature", "0.7", "--output", str(out)],
                   cache=fit_run["tmp"] / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy pass@1" in proc.stdout
    assert any(line.split() == ["examples", "5"] for line in proc.stdout.splitlines())
    assert "mean pass@1 (K=2, T=0.7)" in proc.stdout and "majority vote (K=2)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["n"] == 5 and len(result["records"]) == 5
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == sum(r["correct"] for r in result["records"]) / 5
    assert (result["policy"], result["task"], result["split"]) == (str(fit_run["export"]), "arithmetic", "test")
    assert result["samples"] == 2 and result["temperature"] == 0.7
    assert 0.0 <= result["pass@1_mean"] <= 1.0 and 0.0 <= result["majority"] <= 1.0
    assert all(len(r["samples"]) == 2 for r in result["records"])
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # written atomically, no temp file


def test_evaluate_task_config_sets_the_tasks_arguments(fit_run, tmp_path):
    out = tmp_path / "out.json"
    proc = run_cli(["evaluate", "--policy", str(fit_run["export"]), "--task", "arithmetic", "--limit", "3",
                    "--max-new-tokens", "4", "--task-config", "{num_operands: 3, n_train: 20, n_validation: 5, n_test: 3}", "--output", str(out)],
                   cache=fit_run["tmp"] / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from lit_reason.tasks import get_task

    task = get_task("arithmetic", num_operands=3, n_train=20, n_validation=5, n_test=3)
    records = json.loads(out.read_text())["records"]
    assert [r["prompt"] for r in records] == [task.prompt(e) for e in task.examples("test")]
    assert all(r["prompt"].count("+") + r["prompt"].count("-") >= 2 for r in records)  # 3 operands
    bad = run_cli(["evaluate", "--policy", str(fit_run["export"]), "--task", "arithmetic", "--task-config", "[3]"],
                  cache=fit_run["tmp"] / "cache")
    assert bad.returncode == 2 and "--task-config" in bad.stderr


def test_evaluate_unknown_task(fit_run):
    proc = run_cli(["evaluate", "--policy", str(fit_run["export"]), "--task", "nosuch"], cache=fit_run["tmp"] / "cache")
    assert proc.returncode != 0
    assert "nosuch" in proc.stderr and "arithmetic" in proc.stderr  # the known tasks are listed


def test_evaluate_missing_policy(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    proc = run_cli(["evaluate", "--policy", str(missing), "--task", "arithmetic", "--limit", "2"],
                   cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


def test_evaluate_gsm8k_real_data(fit_run, data_dir, tmp_path):
    out = tmp_path / "gsm8k.json"
    proc = run_cli(["evaluate", "--policy", str(fit_run["export"]), "--task", "gsm8k", "--data",
                    str(data_dir / "gsm8k"), "--limit", "3", "--max-new-tokens", "8", "--output", str(out)],
                   cache=fit_run["tmp"] / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n"] == 3 and len(result["records"]) == 3
    # a 2-step tiny model writing 8 tokens cannot solve GSM8K
    assert result["accuracy"] == 0.0
    with (data_dir / "gsm8k" / "test.jsonl").open() as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    for rec, row in zip(result["records"], rows):
        assert row["question"] in rec["prompt"]
        assert rec["reference"] == row["answer"].split("####")[-1].strip()


# ---------------------------------------------------------------- one-line config errors (issue #14)
def _truncated_checkpoint(folder: Path) -> Path:
    import torch

    path = folder / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_INPUTS = [
    (["--model.init_args.batch_size", "-4"], "model.init_args.batch_size must be an integer >= 1, got -4"),
    (["--model.init_args.task", "arithmetik"], "unknown task 'arithmetik'; known tasks: arithmetic, gsm8k, math"),
    (["--model.init_args.task.name", "arithmetik"], "--model.init_args.task '{name: arithmetik}'"),
    (["--model.init_args.policy", "runs/no/such/policy"], "policy folder runs/no/such/policy does not exist"),
    (["--trainer.max_steps", "-5"], "trainer.max_steps must be -1 (no limit) or an integer >= 0"),
    (["--ckpt_path", "CUT"], "is truncated or not a torch checkpoint"),
    (["--ckpt_path", "MISSING"], "does not exist"),
    (["--ckpt_path", "last"], "ckpt_path=last: no checkpoint at"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_line_before_any_model_is_built(tmp_path, capsys, built_modules, args, message):
    from lit_reason.cli import main

    built = built_modules
    args = [{"CUT": str(_truncated_checkpoint(tmp_path)), "MISSING": str(tmp_path / "none.ckpt")}.get(a, a)
            for a in args]
    recipe = write_recipe(tmp_path, tmp_path / "root")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-5:]
    assert not [line for line in err if line.startswith("Traceback")], "\n".join(err)
    assert built == [], f"built before failing: {built}"
    if "truncated" in message:
        assert "cut.ckpt" in err[-1]  # the file is named


def test_two_concurrent_fits_into_one_root_get_their_own_folders(tmp_path):
    root = tmp_path / "root"
    recipe = write_recipe(tmp_path, root)
    env = {**os.environ, "LIT_REASON_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "lit_reason", "fit", "--config", str(recipe),
                               "--seed_everything", str(seed)], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    versions = sorted(p.name for p in (root / "csv").iterdir())
    assert versions == ["version_0", "version_1"]
    seeds, pids = set(), set()
    for v in versions:
        folder = root / "csv" / v
        seeds.add(yaml_load(folder / "config.yaml")["seed_everything"])
        pids.add(json.loads((folder / "run.json").read_text())["pid"])
        with (folder / "metrics.csv").open() as f:
            assert any(r.get("train/loss") for r in csv.DictReader(f))
    assert seeds == {0, 1} and pids == {p.pid for p in procs}
    # each closing line names its own folder
    lines = [next(l for l in out.splitlines() if l.startswith("lit_reason: fit done")) for out, _ in outs]
    assert {line.split("run folder ")[1].split(";")[0] for line in lines} == {str(root / "csv" / v) for v in versions}


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())




@pytest.mark.parametrize("args,message", [
    (["--model.init_args.beta", "0"], "error: beta must be > 0, got 0.0"),
    (["--model.init_args.share_trunk", "true"], "error: share_trunk: true needs a LoRA policy: set `lora`"),
], ids=["beta", "share_trunk"])
def test_a_constructor_check_is_the_one_line_error(tmp_path, capsys, built_modules, args, message):
    # jsonargparse wraps a constructor's ValueError in "Does not validate against any of the Union
    # subtypes"; the CLI shows the constructor's own message, which names the key
    from lit_reason.cli import main

    recipe = tmp_path / "oreo.yaml"
    recipe.write_text(one_step_config("OREO"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message), err[-5:]
    assert built_modules == [], f"built before failing: {built_modules}"
