"""The offline methods side by side on the embedded task: SFT (the start policy), RFT, DPO, OREO,
DQO and DVO, each from `embedded:arithmetic`, evaluated on the same 200 held-out prompts.

Each (method, seed) runs its recipe unchanged through the CLI (the recipes share one collected
dataset, so the first run collects it and the others reuse it) with one evaluator after every
epoch; the numbers are read back from the run's metrics.csv. ``--rounds R`` instead appends
``callbacks/iterative_rounds.yaml`` with R rounds of one epoch and reports the accuracy after each
round.

Run:  python benchmarks/offline_methods.py [--methods rft dpo oreo dqo dvo] [--seeds 0 1]
      python benchmarks/offline_methods.py --methods oreo --rounds 3 --seeds 0
Extra CLI overrides for every run go after ``--``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vineppo_vs_ppo import eval_every_fragment, fit_recipe, read  # noqa: E402  (same runner and reader)

REPO = Path(__file__).resolve().parents[1]


def run(method: str, seed: int, root: Path, rounds: int | None, extra: list[str]) -> float:
    fragment = "trainer:\n  callbacks+:\n" + eval_every_fragment("every_n_epochs: 1")
    if rounds:  # callbacks/iterative_rounds.yaml with R rounds of one epoch
        fragment = (f"trainer:\n  max_epochs: {rounds}\n  callbacks+:\n" + eval_every_fragment("every_n_epochs: 1")
                    + "    - class_path: lit_reason.callbacks.IterativeRounds\n"
                    f"      init_args: {{rounds: {rounds}, epochs_per_round: 1}}\n")
    return fit_recipe(method, seed, root, fragment, extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["rft", "dpo", "oreo", "dqo", "dvo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--rounds", type=int, default=None, help="iterative rounds (one epoch each)")
    p.add_argument("--out", default="runs/bench/offline")
    p.add_argument("--reuse", action="store_true", help="read existing runs instead of training again")
    p.add_argument("extra", nargs="*", help="extra CLI overrides passed to every run")
    args = p.parse_args()
    out = REPO / args.out
    results: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            root = out / (f"{method}-rounds{args.rounds}-seed{seed}" if args.rounds else f"{method}-seed{seed}")
            wall = None if args.reuse else run(method, seed, root, args.rounds, args.extra)
            res = read(root)
            res["wall_seconds"] = wall
            results.setdefault(method, []).append(res)
            curve = ", ".join(f"{acc:.3f}@{step}" for step, acc, _ in res["curve"])
            print(f"{method} seed {seed}: {curve}" + (f" ({wall:.0f} s wall)" if wall else ""), flush=True)
    (out / ("summary-rounds.json" if args.rounds else "summary.json")).write_text(json.dumps(results, indent=1))

    print()
    print("held-out greedy accuracy (validation, 200 prompts); per-seed values in brackets")
    if args.rounds:
        header = f"{'method':<8}{'start':>8}" + "".join(f"{f'round {k + 1}':>22}" for k in range(args.rounds))
        print(header)
        print("-" * len(header))
        for method, runs in results.items():
            cells = []
            for k in range(args.rounds):
                accs = [r["curve"][k + 1][1] for r in runs if len(r["curve"]) > k + 1]
                cells.append(f"{mean(accs):.3f} [" + ", ".join(f"{a:.3f}" for a in accs) + "]" if accs else "-")
            print(f"{method:<8}{mean(r['start'] for r in runs):>8.3f}" + "".join(f"{c:>22}" for c in cells))
        return
    header = f"{'method':<8}{'start':>7}{'end':>7}  {'end per seed':<18}{'steps':>6}{'wall s':>8}{'rank_acc':>10}"
    print(header)
    print("-" * len(header))
    for method, runs in results.items():
        per_seed = "[" + ", ".join(f"{r['end']:.3f}" for r in runs) + "]"
        walls = [r["wall_seconds"] for r in runs if r["wall_seconds"]]
        rank = [r["value"]["value/rank_acc"] for r in runs if "value/rank_acc" in r["value"]]
        print(f"{method:<8}{mean(r['start'] for r in runs):>7.3f}{mean(r['end'] for r in runs):>7.3f}  {per_seed:<18}"
              f"{mean(r['steps'] for r in runs):>6.0f}{(f'{mean(walls):.0f}' if walls else '-'):>8}"
              f"{(f'{mean(rank):.3f}' if rank else '-'):>10}")


if __name__ == "__main__":
    main()
