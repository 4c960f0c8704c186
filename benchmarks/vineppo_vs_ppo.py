"""VinePPO vs PPO vs GRPO (and RLOO) on the embedded task: accuracy against gradient steps and
wall-clock, and how well each method's value ranks alternative next steps.

Each (method, seed) runs its recipe unchanged through the CLI, with one extra evaluator every
``--eval-every`` optimiser steps; everything is read back from the run's metrics.csv.

Run:  python benchmarks/vineppo_vs_ppo.py [--methods vineppo ppo grpo rloo] [--seeds 0 1] [--eval-every 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]


def eval_every_fragment(every: str) -> str:
    """``callbacks+`` entry of EvalAccuracy on the first 200 validation prompts (``every``: its trigger)."""
    return (f"    - class_path: lit_reason.callbacks.EvalAccuracy\n"
            f"      init_args: {{split: validation, limit: 200, {every}}}\n")


def fit_recipe(method: str, seed: int, root: Path, fragment: str, extra: list[str]) -> float:
    """Runs ``python -m lit_reason fit`` on ``recipes/<method>.yaml`` plus the YAML ``fragment``.

    The run is seeded (``seed_everything`` and the module's ``seed``), writes into ``root``, logs
    W&B offline and can import ``benchmarks.*`` (for benchmark callbacks). Returns its wall seconds.
    """
    path = root / "bench.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fragment)
    cmd = [sys.executable, "-m", "lit_reason", "fit", "--config", f"recipes/{method}.yaml", "--config", str(path),
           "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def run(method: str, seed: int, root: Path, eval_every: int, extra: list[str]) -> float:
    fragment = "trainer:\n  callbacks+:\n" + eval_every_fragment(f"every_n_steps: {eval_every}")
    return fit_recipe(method, seed, root, fragment, extra)


def read(root: Path) -> dict:
    (path,) = root.rglob("metrics.csv")
    rows = list(csv.DictReader(open(path)))
    evals: dict[int, tuple[float, float]] = {}
    for r in rows:
        if r.get("val/accuracy"):
            evals.setdefault(int(r["step"]), (float(r["val/accuracy"]), float(r["time/train_seconds"])))
    last = {}
    for r in rows:
        for k, v in r.items():
            if v != "" and k.startswith("value/"):
                last[k] = float(v)
    steps = sorted(evals)
    return {"curve": [(s, *evals[s]) for s in steps], "start": evals[steps[0]][0], "end": evals[steps[-1]][0],
            "steps": steps[-1], "train_seconds": evals[steps[-1]][1], "value": last}


def first_reaching(curve, target: float):
    for step, acc, seconds in curve:
        if acc >= target:
            return step, seconds
    return None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["vineppo", "ppo", "grpo", "rloo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--out", default="runs/bench/vineppo_vs_ppo")
    p.add_argument("--reuse", action="store_true", help="read existing runs instead of training again")
    p.add_argument("extra", nargs="*", help="extra CLI overrides passed to every run")
    args = p.parse_args()
    out = REPO / args.out
    results: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            root = out / f"{method}-seed{seed}"
            wall = None
            if not args.reuse:
                wall = run(method, seed, root, args.eval_every, args.extra)
            res = read(root)
            res["wall_seconds"] = wall
            results.setdefault(method, []).append(res)
            print(f"{method} seed {seed}: start {res['start']:.3f} -> end {res['end']:.3f} in {res['steps']} steps, "
                  f"{res['train_seconds']:.0f} s training" + (f", {wall:.0f} s wall" if wall else ""), flush=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1))

    ref = mean(r["end"] for r in results.get("ppo", [])) if "ppo" in results else None
    print()
    print("held-out greedy accuracy (validation, 200 prompts), mean over seeds; per-seed in brackets")
    header = (f"{'method':<9}{'start':>7}{'end':>7}{'  end per seed':<22}{'steps':>6}{'train s':>9}{'s/step':>8}"
              f"{'steps to PPO end':>18}{'s to PPO end':>14}{'rank_acc':>10}{'mae_vs_mc':>11}")
    print(header)
    print("-" * len(header))
    for method, runs in results.items():
        reach = [first_reaching(r["curve"], ref) for r in runs] if ref is not None else []
        steps_to = [s for s, _ in reach if s is not None]
        secs_to = [t for _, t in reach if t is not None]
        per_seed = "[" + ", ".join(f"{r['end']:.3f}" for r in runs) + "]"
        rank = [r["value"].get("value/rank_acc") for r in runs if "value/rank_acc" in r["value"]]
        mae = [r["value"].get("value/mae_vs_mc") for r in runs if "value/mae_vs_mc" in r["value"]]
        print(f"{method:<9}{mean(r['start'] for r in runs):>7.3f}{mean(r['end'] for r in runs):>7.3f}  {per_seed:<20}"
              f"{mean(r['steps'] for r in runs):>6.0f}{mean(r['train_seconds'] for r in runs):>9.0f}"
              f"{mean(r['train_seconds'] / max(r['steps'], 1) for r in runs):>8.2f}"
              f"{(f'{mean(steps_to):.0f} ({len(steps_to)}/{len(runs)})' if steps_to else 'not reached'):>18}"
              f"{(f'{mean(secs_to):.0f}' if secs_to else '-'):>14}"
              f"{(f'{mean(rank):.3f}' if rank else '-'):>10}{(f'{mean(mae):.3f}' if mae else '-'):>11}")
    if ref is not None:
        print(f"\n'to PPO end': first evaluation at or above PPO's mean final accuracy ({ref:.3f}); "
              "train s excludes the evaluator's own time.")


if __name__ == "__main__":
    main()
