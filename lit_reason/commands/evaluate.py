"""``python -m lit_reason evaluate``: accuracy table on the terminal and a JSON file."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from lit_reason.commands import run_reporting_bad_input


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_reason evaluate", description="Evaluate a policy on a task.")
    p.add_argument("--policy", required=True, help="embedded:arithmetic, a save_pretrained folder, or a hub name")
    p.add_argument("--task", required=True, help="task name: arithmetic, gsm8k, math")
    p.add_argument("--data", default=None, help="task data: a folder or jsonl file (gsm8k, math); default: $LIT_REASON_DATA")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of the split")
    p.add_argument("--samples", type=int, default=0, help="K sampled responses per example besides the greedy one")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the K samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 96 for arithmetic, 256 otherwise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bf16 / float32 ...")
    p.add_argument("--output", default=None, help="write the JSON result here")
    return p


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str]) -> int:
    """Runs the command; bad input (task, data, policy) exits 2 with one line naming the culprit."""
    return run_reporting_bad_input(_run, argv)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 0:
        raise SystemExit(f"--samples must be >= 0, got {args.samples}")
    from lit_reason.tasks import get_task

    # the task (a light import) first, so a typo in --task or --data fails before torch loads
    task = get_task(args.task, **({"path": args.data} if args.data else {}))
    examples = task.examples(args.split)[: args.limit]

    from lit_reason.evaluation import evaluate_policy, format_table
    from lit_reason.models.loading import load_policy

    model, tokenizer = load_policy(args.policy, dtype=args.dtype)
    max_new = args.max_new_tokens or (96 if args.task == "arithmetic" else 256)
    result = evaluate_policy(model, tokenizer, task, examples, samples=args.samples, temperature=args.temperature,
                             top_p=args.top_p, max_new_tokens=max_new, batch_size=args.batch_size, seed=args.seed,
                             progress=True)
    result.update({"policy": args.policy, "task": args.task, "split": args.split})
    print(format_table(result, f"{args.policy} on {args.task}/{args.split}"))
    if args.output:
        write_json_atomic(result, args.output)
        print(f"wrote {args.output}")
    return 0
