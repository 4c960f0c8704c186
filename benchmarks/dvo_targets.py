"""DVO's target sources compared on the embedded task (docs/dvo.md).

For each source (``mcts``: Q along the search's paths; ``value_model``: an outcome value model
trained by MSE on outcomes; ``mc``: plain Monte Carlo estimates), the start policy
``embedded:arithmetic`` builds a DVO target dataset on the first ``--prompts`` training prompts
(:func:`lit_reason.data.dvo_targets.build_target_dataset`, the same code as ``fit``), then:

1. **Target quality.** On the rows of the first ``--quality-prompts`` prompts, every step state
   S_k gets a ground-truth value V*(S_k) = 2 * (mean outcome of ``--truth-rollouts`` fresh
   continuations) - 1 (high-sample MC, the +-1 scale of the targets; V*(S_T) = R). Reported:
   the MAE of the source's state values V(S_k) (MCTS: Q(node_k)) and of its step targets against
   V*(S_{k+1}) - V*(S_k); ``rank``: pairwise agreement of V(S) with V* over pairs of distinct states
   of the same prompt (pairs tied in V* are skipped; a tie in V counts 1/2), so it is scale-free.
2. **DVO accuracy.** DVO (the recipe's beta, lr, batch size, epochs) trains on the source's
   dataset; greedy accuracy on 200 validation prompts before and after.
3. **Throughput.** Build wall-clock of each source; for MCTS the search's simulations and
   generated tokens per second.

Run:  python benchmarks/dvo_targets.py [--prompts 256] [--quality-prompts 12] [--truth-rollouts 32]
      [--sources mcts value_model mc] [--seeds 0 1]
Datasets go to ``--out`` (default runs/bench/dvo_targets) and are reused by a second run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

import torch

REPO = Path(__file__).resolve().parents[1]


def state_values(rows: list[dict], source: str) -> list[list[float]]:
    """V(S_0) .. V(S_{T-1}) of each row as the source estimated them (+-1 scale)."""
    if source == "mcts":
        return [list(r["q_path"][:-1]) for r in rows]
    return [list(r["step_values"]) for r in rows]


def states_of(row: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, partial response ids) of S_0 .. S_{T-1}."""
    ends = row["step_ends"]
    return [(row["prompt_ids"], row["response_ids"][: ends[k - 1] + 1] if k else []) for k in range(len(ends))]


def rank_agreement(pred: list[float], truth: list[float], groups: list[int]) -> tuple[float, int]:
    """Pairwise agreement of ``pred`` with ``truth`` over pairs in the same group (ties in truth skipped)."""
    agree, pairs = 0.0, 0
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                dt = truth[i] - truth[j]
                if abs(dt) < 1e-9:
                    continue
                dp = pred[i] - pred[j]
                pairs += 1
                agree += 0.5 if abs(dp) < 1e-9 else float((dp > 0) == (dt > 0))
    return (agree / pairs if pairs else float("nan")), pairs


def quality(rows_by_source: dict[str, list[dict]], policy, tokenizer, task, k: int, seed: int) -> dict:
    """MAE of values and targets and rank agreement against a K-rollout MC ground truth."""
    from lit_reason.rollout.monte_carlo import mc_values
    from lit_reason.rollout.sampler import RolloutEngine

    keys: dict[tuple, int] = {}
    prompts, partials, examples = [], [], []
    train = task.examples("train")
    for rows in rows_by_source.values():
        for r in rows:
            for p, q in states_of(r):
                key = (tuple(p), tuple(q))
                if key not in keys:
                    keys[key] = len(prompts)
                    prompts.append(p)
                    partials.append(q)
                    examples.append(train[r["prompt_index"]])
    engine = RolloutEngine(policy, tokenizer, max_new_tokens=96, temperature=1.0, batch_size=512, seed=seed)
    started = time.perf_counter()
    truth = (2.0 * mc_values(engine, task, prompts, partials, examples, k) - 1.0).tolist()
    print(f"ground truth: {len(prompts)} distinct states x {k} rollouts in {time.perf_counter() - started:.0f} s",
          flush=True)
    out = {}
    for source, rows in rows_by_source.items():
        v_err, t_err, pred, true, groups = [], [], [], [], []
        for r, values in zip(rows, state_values(rows, source)):
            vs = [truth[keys[(tuple(p), tuple(q))]] for p, q in states_of(r)]
            R = 2.0 * float(r["reward"]) - 1.0
            true_targets = [b - a for a, b in zip(vs, vs[1:] + [R])]
            v_err += [abs(a - b) for a, b in zip(values, vs)]
            t_err += [abs(a - b) for a, b in zip(r["step_targets"], true_targets)]
            pred += values
            true += vs
            groups += [r["prompt_index"]] * len(vs)
        rank, pairs = rank_agreement(pred, true, groups)
        out[source] = {"states": len(v_err), "value_mae": mean(v_err), "target_mae": mean(t_err), "rank": rank,
                       "rank_pairs": pairs}
    return out


def train_and_evaluate(data: Path, source: str, seed: int, epochs: int, lr: float, batch_size: int,
                       root: Path) -> tuple[float, float, float]:
    """DVO on a built dataset; greedy accuracy (200 validation prompts) before and after, and train seconds."""
    import lightning.pytorch as pl

    from lit_reason.evaluation import evaluate_policy
    from lit_reason.methods.dvo import DVO

    pl.seed_everything(seed, verbose=False)
    module = DVO(data=str(data), target_source=source, targets=None, lr=lr, batch_size=batch_size, seed=seed,
                 progress=False)
    examples = module.task.examples("validation")[:200]

    def accuracy() -> float:
        return evaluate_policy(module.policy, module.tokenizer, module.task, examples, max_new_tokens=96,
                               batch_size=128)["accuracy"]

    start = accuracy()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    t = time.perf_counter()
    trainer.fit(module)
    return start, accuracy(), time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", default=["mcts", "value_model", "mc"])
    p.add_argument("--prompts", type=int, default=256, help="training prompts each source builds targets on")
    p.add_argument("--quality-prompts", type=int, default=12, help="prompts whose rows get the ground truth")
    p.add_argument("--truth-rollouts", type=int, default=32, help="MC continuations per state of the ground truth")
    p.add_argument("--simulations", type=int, default=40)
    p.add_argument("--leaves-per-tree", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="responses per prompt (value_model, mc)")
    p.add_argument("--mc-rollouts", type=int, default=8, help="continuations per state of the mc source")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/bench/dvo_targets")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from lit_reason.data.trajectories import TrajectoryDataset
    from lit_reason.data.dvo_targets import build_target_dataset, target_dataset_stats
    from lit_reason.models.policy import build_policy
    from lit_reason.steps import StepSplitter
    from lit_reason.tasks import get_task

    out = REPO / args.out
    task = get_task("arithmetic")
    policy, tokenizer = build_policy("embedded:arithmetic")
    splitter = StepSplitter("newline", answer_prefix=task.answer_prefix)
    settings = {
        "mcts": {"simulations": args.simulations, "leaves_per_tree": args.leaves_per_tree},
        "value_model": {"samples": args.samples},
        "mc": {"samples": args.samples, "mc_rollouts": args.mc_rollouts},
    }
    build: dict[str, dict] = {}
    rows_by_source: dict[str, list[dict]] = {}
    for source in args.sources:
        folder = out / f"{source}-p{args.prompts}"
        t = time.perf_counter()
        fresh = not (folder / "meta.json").exists()
        build_target_dataset(policy, tokenizer, task, splitter, folder, source,
                             {"limit": args.prompts, **settings[source]}, policy_name="embedded:arithmetic",
                             progress=False)
        rows = TrajectoryDataset(folder).rows
        info = {"folder": folder, "seconds": time.perf_counter() - t if fresh else None, "rows": len(rows),
                "prompts": len({r["prompt_index"] for r in rows})}
        if source == "mcts":
            stats = target_dataset_stats(folder)
            info.update(simulations_per_s=stats["search/simulations_per_s"], tokens_per_s=stats["search/tokens_per_s"],
                        seconds=stats["search/wall_time"])
        build[source] = info
        rows_by_source[source] = [r for r in rows if r["prompt_index"] < args.quality_prompts]
        print(f"{source}: {info}", flush=True)

    q = quality(rows_by_source, policy, tokenizer, task, args.truth_rollouts, seed=12345)
    acc: dict[str, list[tuple[float, float, float]]] = {}
    for source in args.sources:
        for seed in args.seeds:
            res = train_and_evaluate(build[source]["folder"], source, seed, args.epochs, args.lr, args.batch_size,
                                     out / f"train-{source}-seed{seed}")
            acc.setdefault(source, []).append(res)
            print(f"{source} seed {seed}: accuracy {res[0]:.3f} -> {res[1]:.3f} ({res[2]:.0f} s training)", flush=True)
    summary = {s: {"build": {k: v for k, v in build[s].items() if k != "folder"}, "quality": q[s], "accuracy": acc[s]}
               for s in args.sources}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print()
    print(f"DVO target sources on embedded:arithmetic: targets on {args.prompts} train prompts; quality on the rows "
          f"of {args.quality_prompts} prompts vs a {args.truth_rollouts}-rollout MC ground truth (+-1 scale); "
          f"accuracy = greedy, 200 validation prompts, after {args.epochs} epochs at lr {args.lr}")
    header = (f"{'source':<12}{'rows':>6}{'states':>8}{'value MAE':>11}{'target MAE':>12}{'rank':>7}"
              f"{'acc start':>11}{'acc end':>9}{'  end per seed':<18}{'build s':>9}{'sims/s':>8}{'tok/s':>8}")
    print(header)
    print("-" * len(header))
    for s in args.sources:
        b, qs, a = build[s], q[s], acc[s]
        per_seed = "[" + ", ".join(f"{x[1]:.3f}" for x in a) + "]"
        secs = f"{b['seconds']:.0f}" if b["seconds"] is not None else "reused"
        sims = f"{b['simulations_per_s']:.1f}" if "simulations_per_s" in b else "-"
        toks = f"{b['tokens_per_s']:.0f}" if "tokens_per_s" in b else "-"
        print(f"{s:<12}{b['rows']:>6}{qs['states']:>8}{qs['value_mae']:>11.3f}{qs['target_mae']:>12.3f}"
              f"{qs['rank']:>7.3f}{mean(x[0] for x in a):>11.3f}{mean(x[1] for x in a):>9.3f}  {per_seed:<16}"
              f"{secs:>9}{sims:>8}{toks:>8}")


if __name__ == "__main__":
    main()
