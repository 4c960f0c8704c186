"""Exact resume: a fit stopped at a checkpoint and resumed with ``--ckpt_path`` writes the same
``metrics.csv`` rows and ends with the same parameters as the uninterrupted fit.

Each method runs through the real CLI (``lit_reason.cli.main``) with ``callbacks/checkpoint.yaml``
appended, from ``embedded:arithmetic`` (its responses finish and are sometimes right, so advantages
and updates are non-zero; the random tiny fixture never earns a reward) on tiny task sizes. The uninterrupted fit ``A`` leaves its
step checkpoints; its version folder is copied as the "killed" run (the copy keeps the rows ``A``
wrote after the checkpoint, which a resume must drop) and resumed from a mid-run checkpoint.
VinePPO is also killed for real (SIGKILL of a subprocess once a checkpoint exists) and resumed,
through W&B, checking the resumed W&B run keeps the id.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lit_reason.wandb_history import history

from lit_reason.cli import WANDB_FLUSH_SECONDS

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

# columns that measure wall-clock, not training
TIMING = {"time/train_seconds"}

COMMON = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: "${{trainer.default_root_dir}}", name: csv}}
  callbacks:
    - class_path: lit_reason.callbacks.EvalAccuracy
      init_args: {{split: validation, limit: 4, max_new_tokens: 40, every_n_steps: 4}}
"""

CALIBRATION = """\
    - class_path: lit_reason.callbacks.ValueCalibration
      init_args: {{probe_size: 2, mc_rollouts: 2, rank_states: 2, rank_alternatives: 2, max_new_tokens: 40, every_n_steps: 4, progress: false}}
"""

TASK = "{{name: arithmetic, n_train: 64, n_validation: 8, n_test: 8}}"

ONLINE = """\
  max_steps: 16
model:
  class_path: lit_reason.methods.{cls}
  init_args:
    policy: {policy}
    task: """ + TASK + """
    prompts_per_iteration: 4
    samples_per_prompt: 2
    epochs_per_iteration: 1
    minibatch_size: 4
    max_new_tokens: 40
    temperature: 1.0
    lr: 1.0e-4
    progress: false
{extra}"""

CHECKPOINT = REPO / "callbacks" / "checkpoint.yaml"


def write_recipe(path: Path, root: Path, body: str, calibrate: bool = True) -> Path:
    head = COMMON + (CALIBRATION if calibrate else "")
    # max_steps belongs to the trainer block: the body starts with it (or with other trainer keys)
    trainer_lines, _, model = body.partition("model:\n")
    path.write_text(head.format(root=root) + trainer_lines + "model:\n" + model)
    return path


def fit(args: list[str]) -> None:
    from lit_reason.cli import main

    main(["fit", *args])


def rows(version: Path) -> list[dict]:
    with (version / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k not in TIMING and v != ""} for r in csv.DictReader(f)]


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def resume_copy(version_a: Path, root: Path, ckpt_step: int, base: list[str]) -> Path:
    """Resumes, under ``root``, a copy of run A's version folder from its step-``ckpt_step`` checkpoint.

    The copy is the "killed" run: A's folder as it was after ``ckpt_step`` (its later checkpoints
    removed, its later rows still in metrics.csv: a kill loses nothing written before it).
    """
    version = root / "csv" / "version_0"
    shutil.copytree(version_a, version)
    for ckpt in (version / "checkpoints").glob("*.ckpt"):
        if ckpt.name != f"step={ckpt_step}.ckpt":
            ckpt.unlink()
    (version / "run.json").unlink()
    fit([*base, "--trainer.default_root_dir", str(root),
         "--ckpt_path", str(version / "checkpoints" / f"step={ckpt_step}.ckpt")])
    assert not (root / "csv" / "version_1").exists()  # resumed in its own folder
    return version


def stop_and_resume(tmp_path: Path, recipe: Path, ckpt_step: int, last_step: int) -> tuple[Path, Path]:
    """Runs A uninterrupted, then resumes a copy of A's folder from A's step-``ckpt_step`` checkpoint."""
    base = ["--config", str(recipe), "--config", str(CHECKPOINT)]
    fit([*base, "--trainer.default_root_dir", str(tmp_path / "a")])
    version_a = tmp_path / "a" / "csv" / "version_0"
    version_b = resume_copy(version_a, tmp_path / "b", ckpt_step, base)
    assert rows(version_b) == rows(version_a)
    assert_same_params(version_a / "checkpoints" / f"step={last_step}.ckpt",
                       version_b / "checkpoints" / f"step={last_step}.ckpt")
    return version_a, version_b


# VinePPO's exact resume is checked by the SIGKILL test below
@pytest.mark.parametrize("cls,extra", [("PPO", "    critic_lr: 1.0e-4\n")])
def test_online_resume_is_exact(tmp_path, embedded_arithmetic, cls, extra):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused",
                          ONLINE.format(cls=cls, policy="embedded:arithmetic", extra=extra))
    version_a, _ = stop_and_resume(tmp_path, recipe, ckpt_step=8, last_step=16)
    table = rows(version_a)
    # one step axis: training rows at the optimiser step after their iteration (2 per iteration)
    train_steps = [int(r["step"]) for r in table if "train/reward" in r]
    assert train_steps == list(range(2, 17, 2))
    assert [int(r["step"]) for r in table if "val/accuracy" in r] == [0, 4, 8, 12, 16]
    assert {int(r["step"]) for r in table if "value/mae_vs_mc" in r} == {0, 4, 8, 12, 16}


WANDB_LOGGER = """\
    - class_path: lightning.pytorch.loggers.WandbLogger
      init_args: {save_dir: "${trainer.default_root_dir}", project: lit_reason, name: resume-test}
"""


def run_cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "lit_reason", "fit", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_sigkilled_vineppo_resumes_exactly_in_its_folder_and_wandb_run(tmp_path, embedded_arithmetic):
    body = ONLINE.format(cls="VinePPO", policy="embedded:arithmetic", extra="    mc_rollouts: 2\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", body)
    text = recipe.read_text().replace("  callbacks:\n", WANDB_LOGGER + "  callbacks:\n", 1)
    recipe.write_text(text)
    base = ["--config", str(recipe), "--config", str(CHECKPOINT)]
    # the uninterrupted reference and the run to kill start together (two fits, one machine)
    reference = run_cli([*base, "--trainer.default_root_dir", str(tmp_path / "a")])
    killed = run_cli([*base, "--trainer.default_root_dir", str(tmp_path / "b")])
    version = tmp_path / "b" / "csv" / "version_0"
    deadline = time.time() + 600
    while not (version / "checkpoints" / "last.ckpt").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed: " + killed.communicate()[1][-2000:]
    saved_step = max(int(p.stem.split("=")[1]) for p in (version / "checkpoints").glob("step=*.ckpt"))
    # the CLI has W&B flush its run file every second: 2 s after the checkpoint, every row logged
    # up to it must be on disk when the process dies
    time.sleep(2 * float(WANDB_FLUSH_SECONDS))
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    resumed = run_cli([*base, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", "last"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert not (tmp_path / "b" / "csv" / "version_1").exists()
    reference_version = tmp_path / "a" / "csv" / "version_0"
    assert rows(version) == rows(reference_version)
    assert_same_params(reference_version / "checkpoints" / "step=16.ckpt", version / "checkpoints" / "step=16.ckpt")
    # the resumed fit continued the killed fit's W&B run: one id, two offline segments
    run_id = json.loads((version / "run.json").read_text())["wandb_id"]
    segments = sorted((tmp_path / "b" / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(p.name.endswith(f"-{run_id}") for p in segments)
    # the kill lost no W&B row logged up to the checkpoint: each (metric, step) of the reference
    # run's metrics.csv up to that step is in the killed segment's history
    killed_history = history(next(segments[0].glob("run-*.wandb")))
    on_disk = {(k, row["trainer/global_step"]) for row in killed_history for k in row if not k.startswith("_")}
    expected = {(k, int(r["step"])) for r in rows(reference_version) for k in r
                if k != "step" and int(r["step"]) <= saved_step}
    assert expected and expected <= on_disk, sorted(expected - on_disk)[:10]
    # the closing summary names the folder and the W&B run
    summary = [line for line in out.splitlines() if line.startswith("lit_reason: fit done")]
    assert summary and str(version) in summary[0] and run_id in summary[0] and "accuracy" in summary[0]


OREO = """\
  max_steps: 16
model:
  class_path: lit_reason.methods.OREO
  init_args:
    policy: embedded:arithmetic
    task: """ + TASK + """
    data: {data}
    collect: {{samples: 2, limit: 16, temperature: 1.0}}
    batch_size: 4
    lr: 1.0e-4
    critic_lr: 1.0e-4
    max_new_tokens: 40
    progress: false
"""


def test_offline_oreo_resume_is_exact(tmp_path, embedded_arithmetic):
    # two optimisers per batch: the checkpoint at step 8 is mid-epoch, after 4 of the batches
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", OREO.format(data=tmp_path / "data"))
    version_a, _ = stop_and_resume(tmp_path, recipe, ckpt_step=8, last_step=16)
    table = rows(version_a)
    assert [int(r["step"]) for r in table if "val/accuracy" in r] == [0, 4, 8, 12, 16]
    train_steps = [int(r["step"]) for r in table if any(k.startswith("train/") for k in r)]
    assert train_steps and all(s % 2 == 0 for s in train_steps)  # on the optimiser-step axis


DVPO = """\
  max_steps: 16
model:
  class_path: lit_reason.methods.dvpo.DVPO
  init_args:
    policy: embedded:arithmetic
    task: """ + TASK + """
    gvm: {gvm}
    use_task_reward: true
    whiten_values: false
    prompts_per_iteration: 4
    samples_per_prompt: 2
    epochs_per_iteration: 1
    minibatch_size: 4
    lr: 1.0e-4
    temperature: 1.0
    kl_coef: 0.0
    max_new_tokens: 40
    progress: false
"""


def test_dvpo_stage2_resume_is_exact(tmp_path, embedded_arithmetic):
    from lit_reason.models.loading import load_tokenizer
    from lit_reason.models.value import ValueModel

    torch.manual_seed(0)
    gvm = ValueModel.from_policy_name(str(embedded_arithmetic), bias=True, zero_init=False)
    gvm_dir = gvm.save(tmp_path / "gvm", tokenizer=load_tokenizer(str(embedded_arithmetic)))
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", DVPO.format(gvm=gvm_dir))
    stop_and_resume(tmp_path, recipe, ckpt_step=8, last_step=16)


DVO_REFRESH = """\
  max_epochs: 2
  max_steps: 24
model:
  class_path: lit_reason.methods.DVO
  init_args:
    policy: embedded:arithmetic
    task: """ + TASK + """
    data: {data}
    targets: {{limit: 16, simulations: 6, width: 3, max_depth: 3, leaves_per_tree: 2, chunk_size: 16,
              max_correct: 2, max_incorrect: 2}}
    batch_size: 1
    lr: 1.0e-4
    max_new_tokens: 40
    progress: false
"""

REFRESH = REPO / "callbacks" / "mcts_refresh.yaml"
# the target builds' and the search's speed are wall-clock, not training
REFRESH_TIMING = {"data/build_seconds", "refresh/build_seconds", "refresh/simulations_per_s", "refresh/tokens_per_s"}


def test_dvo_with_target_refresh_resumes_exactly_before_and_after_the_refresh(tmp_path, embedded_arithmetic):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", DVO_REFRESH.format(data=tmp_path / "data"),
                          calibrate=False)
    base = ["--config", str(recipe), "--config", str(CHECKPOINT), "--config", str(REFRESH)]
    fit([*base, "--trainer.default_root_dir", str(tmp_path / "a")])
    version_a = tmp_path / "a" / "csv" / "version_0"
    table = rows(version_a)
    refresh_steps = [int(r["step"]) for r in table if "refresh/rows" in r]
    assert len(refresh_steps) == 1 and 8 < refresh_steps[0] < 16, refresh_steps  # one refresh, between the checkpoints
    last = max(int(p.stem.split("=")[1]) for p in (version_a / "checkpoints").glob("step=*.ckpt"))

    def strip(table):
        return [{k: v for k, v in r.items() if k not in REFRESH_TIMING} for r in table]

    # step 8: before the refresh, which the resumed run must redo (same seed, same policy) into its own root;
    # step 16: after it, the resumed run trains on the refreshed targets named by the checkpoint
    for ckpt_step in (8, 16):
        root = tmp_path / f"resumed{ckpt_step}"
        version = resume_copy(version_a, root, ckpt_step, base)
        assert (root / "mcts_refresh" / "refresh1").exists() == (ckpt_step == 8)
        assert strip(rows(version)) == strip(table)
        assert_same_params(version_a / "checkpoints" / f"step={last}.ckpt", version / "checkpoints" / f"step={last}.ckpt")


RFT_ROUNDS = """\
  max_epochs: 3
model:
  class_path: lit_reason.methods.RFT
  init_args:
    policy: embedded:arithmetic
    task: """ + TASK + """
    data: {data}
    collect: {{samples: 4, limit: 16, temperature: 1.0}}
    batch_size: 2
    lr: 1.0e-4
    max_new_tokens: 40
    progress: false
"""

ROUNDS = REPO / "callbacks" / "iterative_rounds.yaml"
ROUNDS_TIMING = {"rounds/build_seconds", "data/build_seconds"}


def test_iterative_rounds_resume_exactly_across_a_round_switch(tmp_path, embedded_arithmetic):
    # RFT, 3 rounds of one epoch; checkpoints every 8 steps: the resumed run starts from the first
    # checkpoint after the switch to round 1 (its data named by the checkpoint, not collected again)
    # and must collect round 2 itself, identically, into its own root
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", RFT_ROUNDS.format(data=tmp_path / "data"),
                          calibrate=False)
    base = ["--config", str(recipe), "--config", str(CHECKPOINT), "--config", str(ROUNDS)]
    fit([*base, "--trainer.default_root_dir", str(tmp_path / "a")])
    version_a = tmp_path / "a" / "csv" / "version_0"

    def strip(table):
        return [{k: v for k, v in r.items() if k not in ROUNDS_TIMING} for r in table]

    table = rows(version_a)
    switches = [int(r["step"]) for r in table if "rounds/rows" in r]
    assert len(switches) == 2, switches  # rounds 1 and 2
    saved = sorted(int(p.stem.split("=")[1]) for p in (version_a / "checkpoints").glob("step=*.ckpt"))
    after_switch = [s for s in saved if switches[0] <= s < switches[1]]
    assert after_switch, f"no checkpoint inside round 1 (switches at {switches}, checkpoints {saved})"
    ckpt_step, last = after_switch[0], saved[-1]
    root = tmp_path / "b"
    version = resume_copy(version_a, root, ckpt_step, base)
    assert not (root / "rounds" / "round1").exists() and (root / "rounds" / "round2").exists()
    assert strip(rows(version)) == strip(table)
    assert_same_params(version_a / "checkpoints" / f"step={last}.ckpt", version / "checkpoints" / f"step={last}.ckpt")
