"""``python -m lit_reason sweep SWEEP.yaml --count N [-- overrides]``: run a W&B sweep of a recipe.

The sweep file is W&B's own format (``sweeps/*.yaml``: ``method``, ``metric``, ``parameters``,
``command`` with ``${args}``). Every trial is an ordinary ``python -m lit_reason fit`` of the
command in the file with the trial's ``--key=value`` overrides (plus any given after ``--``).

* **online** (``WANDB_MODE=online``, logged in): the sweep is created on the W&B server
  (``wandb.sweep``) and ``wandb agent --count N`` runs the trials; W&B groups them under the sweep.
* **offline** (the default here; no network): W&B's sweep engine itself, the ``sweeps`` package
  (``pip install --no-deps sweeps``; grid / random / bayes from the same YAML), proposes each
  trial from the finished ones. Trials run one after another in ``<root>/<sweep id>/trial<k>``
  (``--root``, default ``runs/sweeps``), their W&B runs share the group ``sweep-<id>``
  (``WANDB_RUN_GROUP``), and the trial's metric is its last logged value in ``metrics.csv``
  (W&B's summary value). ``sweep.json`` in the sweep folder records every trial.

Both end with a table of the trials, their overrides and metric, and the best trial named.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import secrets
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from lit_reason.commands import run_reporting_bad_input


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_reason sweep",
                                description="Run a W&B sweep of a recipe (online agent, or W&B's sweep engine offline).")
    p.add_argument("sweep", help="sweep file (sweeps/vineppo.yaml)")
    p.add_argument("--count", type=int, default=None, help="number of trials (default: all grid points; required otherwise)")
    p.add_argument("--engine", choices=("auto", "agent", "local"), default="auto",
                   help="agent: wandb sweep + wandb agent (needs WANDB_MODE=online); local: W&B's sweep engine "
                        "in this process; auto: agent when WANDB_MODE=online, else local")
    p.add_argument("--root", default="runs/sweeps", help="folder of the sweep's trials (local engine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random/bayes proposals (local engine)")
    p.add_argument("--project", default="lit_reason", help="W&B project")
    return p


def load_sweep(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    cfg = yaml.safe_load(file.read_text())
    for key in ("method", "metric", "parameters", "command"):
        if key not in (cfg or {}):
            raise ValueError(f"sweep file {path}: missing `{key}` (W&B sweep format: method, metric, parameters, command)")
    if cfg["method"] not in ("grid", "random", "bayes"):
        raise ValueError(f"sweep file {path}: method must be grid, random or bayes, got {cfg['method']!r}")
    if "${args}" not in cfg["command"]:
        raise ValueError(f"sweep file {path}: `command` must contain \"${{args}}\" (where the trial's overrides go)")
    return cfg


def trial_command(cfg: dict, params: dict[str, Any], extra: list[str]) -> list[str]:
    """The sweep's ``command`` with ``${args}`` expanded to ``--key=value`` (as W&B's agent does)."""
    args = [f"--{k}={v}" for k, v in params.items()]
    out: list[str] = []
    for part in cfg["command"]:
        if part == "${args}":
            out += args + extra
        elif part in ("${interpreter}", "python"):
            out.append(sys.executable)
        elif part == "${program}":
            out.append(cfg.get("program", ""))
        else:
            out.append(part)
    return out


def metric_of(folder: Path, name: str) -> float | None:
    """Last logged value of ``name`` in a trial's ``csv/version_*/metrics.csv`` (W&B's summary value)."""
    value = None
    for path in sorted(folder.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(name) not in (None, ""):
                    value = float(row[name])
    return value


def format_table(trials: list[dict], metric: str, goal: str) -> str:
    keys = sorted({k for t in trials for k in t["params"]})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    header = ["trial", *short, metric, "state", "folder"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for t in trials:
        value = "—" if t["metric"] is None else f"{t['metric']:.4f}"
        lines.append("| " + " | ".join([str(t["trial"]), *(str(t["params"].get(k, "")) for k in keys), value,
                                         t["state"], t["folder"]]) + " |")
    scored = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    if scored:
        best = (max if goal == "maximize" else min)(scored, key=lambda t: t["metric"])
        lines.append(f"best: trial {best['trial']} ({metric} {best['metric']:.4f}, {goal}) "
                     f"{' '.join(f'--{k}={v}' for k, v in best['params'].items())}")
    else:
        lines.append(f"best: none (no trial logged {metric})")
    return "\n".join(lines)


def run_local(cfg: dict, count: int | None, extra: list[str], root: Path, seed: int) -> list[dict]:
    """Offline sweep with W&B's sweep engine proposing each trial from the finished ones."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the engine's pydantic v1-style config warns on import
            import numpy as np
            import sweeps
            from sweeps import RunState, SweepRun
    except ImportError as err:
        raise ValueError(f"the offline sweep engine needs W&B's `sweeps` package ({err}); "
                         "install it with: pip install --no-deps sweeps jsonref scikit-learn") from None
    metric, goal = cfg["metric"]["name"], cfg["metric"].get("goal", "minimize")
    if count is None:
        if cfg["method"] != "grid":
            raise ValueError(f"--count is required for a {cfg['method']} sweep")
        count = math.prod(len(p.get("values", [p.get("value")])) for p in cfg["parameters"].values())
    sweep_id = secrets.token_hex(4)
    folder = root / sweep_id
    folder.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "WANDB_RUN_GROUP": f"sweep-{sweep_id}", "WANDB_JOB_TYPE": "sweep-trial"}
    runs: list = []
    trials: list[dict] = []
    np.random.seed(seed)  # random/bayes proposals draw from NumPy's global RNG
    for k in range(count):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proposal = sweeps.next_run(cfg, runs, validate=True)
        if proposal is None:  # a grid is exhausted
            break
        params = {key: spec["value"] for key, spec in proposal.config.items()}
        trial_dir = folder / f"trial{k}"
        cmd = trial_command(cfg, params, [*extra, f"--trainer.default_root_dir={trial_dir}"])
        print(f"sweep {sweep_id} trial {k}: {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, env=env)
        value = metric_of(trial_dir, metric)
        state = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        proposal.name = f"trial{k}"
        proposal.state = RunState.finished if proc.returncode == 0 else RunState.failed
        proposal.summary_metrics = {} if value is None else {metric: value}
        runs.append(proposal)
        trials.append({"trial": k, "params": params, "metric": value, "state": state, "folder": str(trial_dir)})
        (folder / "sweep.json").write_text(json.dumps({"sweep": cfg, "id": sweep_id, "trials": trials}, indent=1))
    return trials


def run_agent(cfg: dict, count: int | None, extra: list[str], project: str) -> list[dict]:
    """Online sweep: the W&B server proposes, ``wandb agent`` runs the command of the sweep file."""
    import wandb

    if extra:
        cfg = {**cfg, "command": [*cfg["command"], *extra]}
    sweep_id = wandb.sweep(cfg, project=project)
    agent = [sys.executable, "-m", "wandb", "agent", *(["--count", str(count)] if count else []),
             f"{wandb.Api().default_entity}/{project}/{sweep_id}"]
    subprocess.run(agent, check=False)
    sweep = wandb.Api().sweep(f"{wandb.Api().default_entity}/{project}/{sweep_id}")
    metric = cfg["metric"]["name"]
    return [{"trial": i, "params": {k: r.config.get(k) for k in cfg["parameters"]},
             "metric": r.summary.get(metric), "state": r.state, "folder": r.url}
            for i, r in enumerate(sweep.runs)]


def _run(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    cfg = load_sweep(args.sweep)
    engine = args.engine
    if engine == "auto":
        engine = "agent" if os.environ.get("WANDB_MODE", "offline") == "online" else "local"
    if engine == "agent":
        trials = run_agent(cfg, args.count, extra, args.project)
    else:
        trials = run_local(cfg, args.count, extra, Path(args.root), args.seed)
    print(format_table(trials, cfg["metric"]["name"], cfg["metric"].get("goal", "minimize")), flush=True)
    return 0 if any(t["metric"] is not None for t in trials) else 1


def main(argv: list[str]) -> int:
    return run_reporting_bad_input(_run, argv)
