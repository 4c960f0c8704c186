"""``python -m lit_reason evaluate``: accuracy table on the terminal and a JSON file.

``--search greedy`` (default): greedy pass@1, and with ``--samples K`` mean pass@1 and majority vote.
``--search beam --value DIR``: value-guided step beam search (OREO's test-time search, arXiv
2412.16145 Sec. 4.4; docs/oreo.md) with the value model in ``DIR`` (a ``ValueModel.save`` folder
sharing the policy's vocabulary); greedy pass@1 is reported alongside. Example::

    python -m lit_reason evaluate --policy runs/oreo/policy --task gsm8k --search beam \
        --value runs/oreo/value --beam-size 7 --max-steps 20 --output beam.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lit_reason.commands import run_reporting_bad_input
from lit_reason.io import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_reason evaluate", description="Evaluate a policy on a task.")
    p.add_argument("--policy", required=True, help="embedded:arithmetic, a save_pretrained folder, or a hub name")
    p.add_argument("--task", required=True, help="task name: arithmetic, gsm8k, math")
    p.add_argument("--task-config", default=None, metavar="YAML",
                   help="more task arguments as a YAML mapping, e.g. a recipe's "
                        "'{num_operands: 3, n_train: 2000, n_validation: 200, n_test: 500}'")
    p.add_argument("--data", default=None, help="task data: a folder or jsonl file (gsm8k, math); default: $LIT_REASON_DATA")
    p.add_argument("--split", default="test")
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain",
                   help="plain task prompts (default) or the policy's chat template (instruct models)")
    p.add_argument("--system", default=None, help="chat: system prompt (default: the template's)")
    p.add_argument("--instruction", default="default",
                   help="chat: text before the question in the user turn ('default': the task's; '' for none)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of the split")
    p.add_argument("--samples", type=int, default=0, help="K sampled responses per example besides the greedy one")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the K samples, or of the beam search's steps (OREO: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 96 for arithmetic, 256 otherwise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bf16 / float32 ...")
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--search", choices=("greedy", "beam"), default="greedy",
                   help="greedy decoding (default) or value-guided step beam search")
    beam = p.add_argument_group("value-guided step beam search (--search beam)")
    beam.add_argument("--value", default=None, help="value model folder (ValueModel.save); required for beam")
    beam.add_argument("--beam-size", type=int, default=None,
                      help=f"B: beams kept, steps sampled per beam (default {DEFAULT_BEAM_SIZE})")
    beam.add_argument("--max-steps", type=int, default=None,
                      help=f"search rounds at most (default {DEFAULT_MAX_STEPS})")
    beam.add_argument("--max-step-tokens", type=int, default=None,
                      help="length limit of one step (default: --max-new-tokens, the response limit)")
    beam.add_argument("--splitter", default=None, help="step policy: newline (default), double_newline, math")
    return p


DEFAULT_BEAM_SIZE = 4
DEFAULT_MAX_STEPS = 20
_BEAM_ONLY = ("value", "beam_size", "max_steps", "max_step_tokens", "splitter")


def _check_args(args) -> None:
    """Flag errors as ValueError, so the command exits 2 with one line naming the flag."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    if args.search == "greedy":
        given = [f"--{name.replace('_', '-')}" for name in _BEAM_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --search beam")
        return
    if args.value is None:
        raise ValueError("--search beam needs --value DIR, a value model folder (written by ValueModel.save)")
    if args.samples:
        raise ValueError("--samples applies to --search greedy only; --search beam reports the search and greedy")
    for flag, value in (("--beam-size", args.beam_size), ("--max-steps", args.max_steps),
                        ("--max-step-tokens", args.max_step_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    value_dir = Path(args.value).expanduser()
    if not value_dir.is_dir():
        raise FileNotFoundError(f"--value {args.value}: no such value model folder")
    # before the policy loads (minutes for a real model): a policy folder passed by mistake, say
    if not (value_dir / "value_head.json").is_file():
        raise FileNotFoundError(f"--value {args.value} is not a lit_reason value model: it has no value_head.json "
                                "(write one with ValueModel.save)")


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    atomic_write_json(path, obj, indent=1)


def main(argv: list[str]) -> int:
    """Runs the command; bad input (task, data, policy) exits 2 with one line naming the culprit."""
    return run_reporting_bad_input(_run, argv)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from lit_reason.tasks import get_task

    # the task (a light import) first, so a typo in --task or --data fails before torch loads
    task_kwargs = {"path": args.data} if args.data else {}
    if args.task_config is not None:
        import yaml

        extra = yaml.safe_load(args.task_config)
        if not isinstance(extra, dict) or "name" in extra or "prompt_format" in extra:
            raise ValueError(f"--task-config {args.task_config!r}: give a YAML mapping of task arguments "
                             f"(not name or prompt_format: use --task and --prompt-format)")
        task_kwargs.update(extra)
    if args.prompt_format == "chat":
        task_kwargs["prompt_format"] = {"kind": "chat", "system": args.system, "instruction": args.instruction}
    elif args.system is not None or args.instruction != "default":
        raise ValueError("--system and --instruction apply to --prompt-format chat only")
    task = get_task(args.task, **task_kwargs)
    examples = task.examples(args.split)[: args.limit]

    from lit_reason.evaluation import evaluate_beam_search, evaluate_policy, format_table, load_search_value_fn
    from lit_reason.models.loading import load_policy

    splitter = None
    if args.search == "beam":
        from lit_reason.steps import StepSplitter

        # the answer line stays with the last reasoning step, as in collect and the methods
        splitter = StepSplitter(args.splitter or "newline", answer_prefix=getattr(task, "answer_prefix", None) or None)
    model, tokenizer = load_policy(args.policy, dtype=args.dtype)
    task.use_tokenizer(tokenizer)  # chat prompts: the policy's chat template (refused when it has none)
    max_new = args.max_new_tokens or (96 if args.task == "arithmetic" else 256)
    if args.search == "beam":
        value_fn, _ = load_search_value_fn(args.value, tokenizer, policy_label=args.policy, policy_model=model,
                                           dtype=args.dtype, batch_size=args.batch_size)
        result = evaluate_beam_search(
            model, tokenizer, task, examples, value_fn, beam_size=args.beam_size or DEFAULT_BEAM_SIZE,
            splitter=splitter, max_steps=args.max_steps or DEFAULT_MAX_STEPS, max_new_tokens=max_new,
            max_step_tokens=args.max_step_tokens, temperature=args.temperature, top_p=args.top_p,
            batch_size=args.batch_size, seed=args.seed, progress=True,
        )
        result.update({"value": args.value, "splitter": splitter.policy})
    else:
        result = evaluate_policy(model, tokenizer, task, examples, samples=args.samples, temperature=args.temperature,
                                 top_p=args.top_p, max_new_tokens=max_new, batch_size=args.batch_size,
                                 seed=args.seed, progress=True)
        result["search"] = "greedy"
    result.update({"policy": args.policy, "task": args.task, "split": args.split})
    print(format_table(result, f"{args.policy} on {args.task}/{args.split}"))
    if args.output:
        write_json_atomic(result, args.output)
        print(f"wrote {args.output}")
    return 0
