"""``python -m lit_reason collect``: roll out a fixed policy into a trajectory dataset on disk.

This module only parses the command line; the collector is
:func:`lit_reason.data.collect.collect` (the offline methods call it directly). The on-disk format
is documented in :mod:`lit_reason.data.trajectories`.

Example::

    python -m lit_reason collect --policy embedded:arithmetic --task arithmetic --limit 256 \\
        --samples 8 --output runs/collect/arith-k8

Interrupted runs resume: run the same command again (complete shards are kept, the rest is
sampled with the same per-chunk seeds, so the result equals an uninterrupted run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lit_reason.commands import run_reporting_bad_input


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_reason collect",
                                description="Roll out a policy on a task split into a trajectory dataset (resumable).")
    p.add_argument("--policy", required=True, help="embedded:arithmetic, a save_pretrained folder, or a hub name")
    p.add_argument("--task", required=True, help="task name: arithmetic, gsm8k, math")
    p.add_argument("--data", default=None,
                   help="task data: a folder or jsonl file (gsm8k, math); default: $LIT_REASON_DATA")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="collect on the first N prompts of the split")
    p.add_argument("--samples", type=int, required=True, help="K sampled responses per prompt")
    p.add_argument("--output", required=True,
                   help="dataset folder (created; an existing one for the same request resumes)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32, help="prompts per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--splitter", default="newline", help="step policy: newline, double_newline, math")
    p.add_argument("--dtype", default=None, help="bf16 / float32 ...")
    return p


def format_summary(summary: dict, path: str | Path) -> str:
    """The summary as a few terminal lines."""
    rows = [("rows", str(summary["rows"])), ("prompts", str(summary["prompts"])),
            ("mean reward", f"{summary['mean_reward']:.4f}"), ("fraction finished", f"{summary['finished']:.4f}"),
            ("rows skipped (no steps)", str(summary["skipped"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"trajectory dataset {path}", "-" * (width + 12)] + [f"{k:<{width}}  {v:>8}" for k, v in rows])


def main(argv: list[str]) -> int:
    """Runs the command; bad input (task, data, policy, a mismatching output) exits 2 with one line naming the culprit."""
    return run_reporting_bad_input(_run, argv)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--limit", args.limit), ("--samples", args.samples), ("--chunk-size", args.chunk_size),
                        ("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")  # exits 2
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0 to collect samples, got {args.temperature}")
    from lit_reason.tasks import get_task

    # the task (a light import) first, so a typo in --task or --data fails before torch loads
    task = get_task(args.task, **({"path": args.data} if args.data else {}))
    task.examples(args.split)
    from lit_reason.data.collect import collect, dataset_summary  # torch loads only now

    out = collect(args.policy, task, args.output, args.samples, split=args.split, limit=args.limit,
                  temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  chunk_size=args.chunk_size, splitter=args.splitter, progress=True, batch_size=args.batch_size,
                  dtype=args.dtype)
    print(format_summary(dataset_summary(out), out))
    return 0
