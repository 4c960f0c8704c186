"""DVPO (frozen pretrained GVM) vs PPO (learned critic) on the embedded task: memory, time, accuracy.

The DVPO paper's efficiency claims (arXiv 2502.16944 v1, Table 3; docs/dvpo.md: -23..-34% GPU memory, -31..-43%
s/step, -25..-35% steps to converge) measured here on the same task, budget and batch: each
(method, seed) runs its recipe unchanged through the CLI (``recipes/dvpo.yaml``: 128 prompts x 1
sample; ``recipes/ppo.yaml``: 32 prompts x 4 samples; both 128 sequences and 4 optimiser steps per
iteration, 160 steps), plus an evaluator every ``--eval-every`` steps and :class:`MemoryProbe`.
DVPO's stage 1 runs once before (cached, as ``gvm: null`` would) and is timed separately.

Measured per run (in the training process):
    * peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of fit (whole process:
      Python, tokenizer, policy, reference, critic or GVM, optimiser, activations, rollouts).
    * torch allocator peak: ``torch.cuda.max_memory_allocated()`` on a GPU. On CPU torch keeps no
      allocator statistics, so the table shows instead the *model state* bytes: every parameter of
      the module and of the reference + gradients + optimiser state (what the GPU number is
      dominated by at these sizes); activations are not included on CPU.
    * time per iteration: wall-clock of each training iteration (rollout + targets + updates),
      evaluator excluded; mean over iterations.
    * iterations to target: first evaluation at or above ``--target`` (default: PPO's mean final
      accuracy), in iterations (4 optimiser steps each).
    * final accuracy: greedy, first 200 validation prompts.

Run:  python benchmarks/dvpo_vs_ppo.py [--seeds 0 1] [--eval-every 20] [-- extra CLI overrides]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from pathlib import Path
from statistics import mean

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/dvpo_vs_ppo.py` from a checkout without an install
    sys.path.insert(0, str(REPO))
from benchmarks.vineppo_vs_ppo import eval_every_fragment, fit_recipe  # noqa: E402  (the shared runner)

PROBE_FILE = "memory_probe.json"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class MemoryProbe(pl.Callback):
    """Writes peak memory and per-iteration times of a fit to ``<default_root_dir>/memory_probe.json``."""

    def __init__(self) -> None:
        self.iter_seconds: list[float] = []
        self._t = 0.0
        self.state_bytes = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.iter_seconds.append(time.perf_counter() - self._t)
        # model state at its largest point (after the first updates the optimiser state exists)
        params = list(pl_module.parameters())
        ref = getattr(getattr(pl_module, "reference", None), "model", None)
        if ref is not None and not getattr(pl_module.reference, "shares_policy", False):
            params += list(ref.parameters())
        opt_state = [v for opt in trainer.optimizers for s in opt.state.values() for v in s.values()]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.state_bytes = max(self.state_bytes, _tensor_bytes(params) + _tensor_bytes(opt_state) + _tensor_bytes(grads))

    def on_train_end(self, trainer, pl_module) -> None:
        out = {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "state_mb": self.state_bytes / 2**20,
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "iterations": len(self.iter_seconds),
            "s_per_iteration": mean(self.iter_seconds) if self.iter_seconds else None,
        }
        if trainer.is_global_zero:
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / PROBE_FILE).write_text(json.dumps(out, indent=1))


def run(method: str, seed: int, root: Path, eval_every: int, extra: list[str]) -> float:
    fragment = ("trainer:\n  callbacks+:\n" + eval_every_fragment(f"every_n_steps: {eval_every}")
                + "    - class_path: benchmarks.dvpo_vs_ppo.MemoryProbe\n")
    return fit_recipe(method, seed, root, fragment, ["--model.init_args.progress", "false", *extra])


def read(root: Path, steps_per_iteration: int) -> dict:
    (path,) = root.rglob("metrics.csv")
    evals: dict[int, float] = {}
    for r in csv.DictReader(open(path)):
        if r.get("val/accuracy"):
            evals.setdefault(int(r["step"]), float(r["val/accuracy"]))
    steps = sorted(evals)
    probe = json.loads((root / PROBE_FILE).read_text())
    curve = [(s / steps_per_iteration, evals[s]) for s in steps]
    return {"curve": curve, "start": curve[0][1], "end": curve[-1][1], **probe}


def first_reaching(curve, target: float):
    return next((it for it, acc in curve if acc >= target), None)


def build_gvm() -> tuple[str, float]:
    """Stage 1 as ``gvm: null`` runs it (cached); returns its folder and the seconds it took here."""
    from lit_reason.methods.dvpo import ensure_gvm

    t = time.perf_counter()
    path = ensure_gvm("embedded:arithmetic", {"name": "arithmetic"}, "dvpo_gvm.yaml")
    return str(path), time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--target", type=float, default=None, help="accuracy target (default: PPO's mean final)")
    p.add_argument("--out", default="runs/bench/dvpo_vs_ppo")
    p.add_argument("--reuse", action="store_true", help="read existing runs instead of training again")
    p.add_argument("extra", nargs="*", help="extra CLI overrides passed to every run (after --)")
    args = p.parse_args()
    out = REPO / args.out
    gvm, stage1_s = build_gvm() if not args.reuse else (None, 0.0)
    if gvm:
        print(f"DVPO stage 1 (GVM): {gvm} ({stage1_s:.0f} s here; 0 when already cached)", flush=True)
    results: dict[str, list[dict]] = {}
    for method in ("dvpo", "ppo"):
        for seed in args.seeds:
            root = out / f"{method}-seed{seed}"
            extra = [*args.extra, *(["--model.init_args.gvm", gvm] if method == "dvpo" and gvm else [])]
            wall = None if args.reuse else run(method, seed, root, args.eval_every, extra)
            res = {**read(root, steps_per_iteration=4), "wall_seconds": wall}
            results.setdefault(method, []).append(res)
            print(f"{method} seed {seed}: {res['start']:.3f} -> {res['end']:.3f}, {res['s_per_iteration']:.2f} s/it, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB" + (f", {wall:.0f} s wall" if wall else ""), flush=True)
    (out / "summary.json").write_text(json.dumps({"stage1_seconds": stage1_s, "gvm": gvm, **results}, indent=1))

    target = args.target if args.target is not None else mean(r["end"] for r in results["ppo"])
    on_gpu = any(r["cuda_peak_mb"] for rs in results.values() for r in rs)
    mem_name = "cuda peak MB" if on_gpu else "state MB"
    rows = {}
    for method, runs in results.items():
        reach = [first_reaching(r["curve"], target) for r in runs]
        hit = [x for x in reach if x is not None]
        rows[method] = {
            "rss": mean(r["peak_rss_mb"] for r in runs),
            "mem": mean((r["cuda_peak_mb"] if on_gpu else r["state_mb"]) for r in runs),
            "sit": mean(r["s_per_iteration"] for r in runs),
            "iters": mean(hit) if hit else None, "reached": f"{len(hit)}/{len(runs)}",
            "start": mean(r["start"] for r in runs), "end": mean(r["end"] for r in runs),
            "per_seed": "[" + ", ".join(f"{r['end']:.3f}" for r in runs) + "]",
            "params": runs[0]["trainable_params"],
        }
    print(f"\nheld-out greedy accuracy: validation, first 200 prompts; means over seeds {args.seeds}; "
          f"target accuracy {target:.3f}")
    header = (f"{'method':<8}{'peak RSS MB':>12}{mem_name:>14}{'trainable':>11}{'s / iter':>10}"
              f"{'iters to target':>17}{'start':>7}{'final':>7}  per seed")
    print(header)
    print("-" * len(header))
    for method, r in rows.items():
        iters = f"{r['iters']:.1f} ({r['reached']})" if r["iters"] is not None else f"- ({r['reached']})"
        print(f"{method:<8}{r['rss']:>12.0f}{r['mem']:>14.1f}{r['params']:>11,}{r['sit']:>10.2f}{iters:>17}"
              f"{r['start']:>7.3f}{r['end']:>7.3f}  {r['per_seed']}")
    d, q = rows["dvpo"], rows["ppo"]
    ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"  # noqa: E731
    print(f"{'DVPO/PPO':<8}{ratio(d['rss'], q['rss']):>12}{ratio(d['mem'], q['mem']):>14}"
          f"{ratio(d['params'], q['params']):>11}{ratio(d['sit'], q['sit']):>10}{ratio(d['iters'], q['iters']):>17}"
          f"{'':>7}{ratio(d['end'], q['end']):>7}")
    print(f"\nDVPO stage 1 (GVM pretraining, once; cached): {stage1_s:.0f} s in this invocation. "
          f"{'On CPU, ' + repr(mem_name) + ' = parameters (module + reference) + gradients + optimiser state.' if not on_gpu else ''}")


if __name__ == "__main__":
    main()
