"""Rolling out a fixed policy into a trajectory dataset on disk (resumable).

The offline methods (RFT, DPO, OREO, DQO, DVO) train on what :func:`collect` writes; the on-disk
format is documented in :mod:`lit_reason.data.trajectories`. It takes a policy name or an
already-loaded ``(model, tokenizer)``, so a callback can re-collect with the current policy;
``python -m lit_reason collect`` (:mod:`lit_reason.commands.collect`) is its command line.

Interrupted collections resume: call it again with the same request (complete shards are kept,
the rest is sampled with the same per-chunk seeds, so the result equals an uninterrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _resolve_task(task: Any):
    """A Task, a task name, or ``{"name": ..., **kwargs}`` (like ``methods.common.resolve_task``,
    without importing the Lightning methods, which would double the command's start-up time)."""
    from lit_reason.tasks import get_task
    from lit_reason.tasks.base import Task

    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return get_task(task)
    if isinstance(task, dict) and "name" in task:
        kwargs = dict(task)
        return get_task(kwargs.pop("name"), **kwargs)
    raise TypeError(f"task must be a Task, a name or a dict with a `name` key, got {task!r}")


def _resolve_splitter(splitter: Any, task):
    from lit_reason.steps import StepSplitter

    if splitter is None:
        splitter = "newline"
    if isinstance(splitter, str):
        # the answer line stays with the last reasoning step, as in the online methods
        return StepSplitter(splitter, answer_prefix=getattr(task, "answer_prefix", None) or None)
    if isinstance(splitter, StepSplitter):
        return splitter
    raise TypeError(f"splitter must be None, a policy name or a StepSplitter, got {type(splitter).__name__}")


def collect(
    policy: Any,
    task: Any,
    output: str | Path,
    samples: int,
    split: str = "train",
    limit: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 96,
    seed: int = 0,
    chunk_size: int = 32,
    splitter: Any = None,
    progress: bool = True,
    batch_size: int = 64,
    policy_name: str | None = None,
    dtype: str | None = None,
    on_shard: Callable[[Path], None] | None = None,
    device: Any = None,
) -> Path:
    """Rolls out ``policy`` on a task split into the trajectory dataset folder ``output``.

    Args:
        policy: A policy name (see :func:`lit_reason.models.loading.load_policy`) or an
            already-loaded ``(model, tokenizer)``.
        task: A Task, a task name, or ``{"name": ..., **kwargs}``.
        output: Dataset folder. Created when absent; when it holds a dataset for the same request
            the collection resumes; for another request (policy, task, sampling ...) it is refused.
        samples: K responses per prompt.
        split: Task split of the prompts.
        limit: Use the first ``limit`` prompts of the split (None: all).
        temperature: Sampling temperature (> 0); behaviour log-probs are taken at it too.
        top_p: Nucleus mass of sampling.
        max_new_tokens: Length limit; truncated responses get reward 0.
        seed: Dataset seed; chunk c is sampled with ``chunk_seed(seed, first prompt of c)``.
        chunk_size: Prompts per shard.
        splitter: None (newline steps), a StepSplitter policy name, or a StepSplitter. A name gets
            the task's answer prefix, so the answer line merges into the last step.
        progress: Progress bar over chunks.
        batch_size: Sequences decoded together (and scored together for the log-probs).
        policy_name: Name recorded in meta for an in-memory model (default: its
            ``config._name_or_path``, or ``"<in-memory>"``). A resume compares it.
        dtype: Parameter dtype when ``policy`` is a name.
        device: Device a policy loaded by name runs on (None: where it loads, the CPU). Offline
            modules pass their training device, so first-use collection runs on the GPU.
        on_shard: Called with each shard's path once it is complete.

    Returns:
        The dataset folder.

    Raises:
        ValueError: Bad settings, or ``output`` holds another dataset (the differing keys named).
    """
    from tqdm.auto import tqdm

    from lit_reason.data import trajectories as td
    from lit_reason.rollout.sampler import RolloutEngine, check_sampling
    from lit_reason.rollout.trajectories import build_batch, encode_prompts

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to collect samples with behaviour log-probs, got {temperature}")
    check_sampling(temperature, top_p, max_new_tokens)
    task = _resolve_task(task)
    if task.prompt_format.is_chat:  # chat prompts need the policy's chat template before they are built
        from lit_reason.models.loading import load_tokenizer

        task.use_tokenizer(load_tokenizer(policy) if isinstance(policy, str) else policy[1])
    examples = task.examples(split)[:limit]
    if not examples:
        raise ValueError(f"split {split!r} of task {task.name!r} has no prompts")
    splitter = _resolve_splitter(splitter, task)

    if isinstance(policy, str):
        model = tokenizer = None
        name = policy_name or policy
    else:
        model, tokenizer = policy
        name = policy_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory>"

    prompts = [task.prompt(e) for e in examples]
    meta = {
        "format": td.FORMAT,
        "version": td.FORMAT_VERSION,
        "policy": name,
        "tokenizer": None,  # filled once the policy is loaded
        "task": {"name": task.name, "config": td.task_config(task)},
        "split": split,
        "num_prompts": len(examples),
        "prompts_sha256": td.prompts_fingerprint(prompts),
        "sampling": {"samples": samples, "temperature": float(temperature), "top_p": float(top_p),
                     "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size},
        "chunk_size": chunk_size,
        "splitter": td.splitter_config(splitter),
    }
    output = Path(output)
    # a mismatching folder fails before the (possibly large) policy is loaded
    td.check_request(output, meta, ignore=("tokenizer",))
    if model is None:
        model, tokenizer = load_collecting_policy(policy, dtype=dtype, device=device)
    meta["tokenizer"] = {"sha256": td.tokenizer_fingerprint(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    done = td.prepare_output(output, meta)

    engine = RolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           batch_size=batch_size, seed=seed, progress=False)
    chunks = [(s, min(s + chunk_size, len(examples)) - 1) for s in range(0, len(examples), chunk_size)]
    todo = [c for c in chunks if c not in done]
    bar = tqdm(todo, desc="collect", unit="chunk", total=len(chunks), initial=len(chunks) - len(todo),
               disable=not progress, dynamic_ncols=True)
    for first, last in bar:
        chunk_examples = examples[first : last + 1]
        chunk_prompts = prompts[first : last + 1]
        prompt_ids = encode_prompts(tokenizer, chunk_prompts)
        engine.reseed(td.chunk_seed(seed, first))
        generations = engine.sample(prompt_ids, samples, desc="collect")
        traj = build_batch(tokenizer, splitter, task, prompt_ids, chunk_prompts, chunk_examples, generations, samples)
        # the sampler's own log-probs at the sampling temperature (> 0 above, so always present)
        logprobs_t = traj.old_logprobs.float().cpu()
        rows = []
        for b, gen in enumerate(generations):
            i, j = divmod(b, samples)
            m = len(gen.ids)
            n_steps = int(traj.num_steps[b])
            rows.append({
                "prompt_index": first + i,
                "split": split,
                "sample_index": j,
                "prompt_ids": list(prompt_ids[i]),
                "response_ids": list(gen.ids),
                "step_ends": traj.step_ends[b, :n_steps].tolist(),
                "reward": float(traj.rewards[b]),
                "finish": gen.finish,
                "behaviour_logprobs": logprobs_t[b, :m].tolist(),
                "response": traj.responses[b],
            })
        path = td.write_shard(output, first, last, rows)
        if on_shard is not None:
            on_shard(path)
    return output


def load_collecting_policy(name: str, dtype: str | None = None, device: Any = None):
    """``(model, tokenizer)`` of the policy ``name``, moved to ``device`` when given (None: left on the CPU)."""
    from lit_reason.models.loading import load_policy

    model, tokenizer = load_policy(name, dtype=dtype)
    if device is not None:
        model.to(device)
    return model, tokenizer


def dataset_summary(path: str | Path) -> dict:
    """Rows, prompts, mean reward, fraction finished and rows skipped of a dataset folder."""
    from lit_reason.data.trajectories import TrajectoryDataset

    ds = TrajectoryDataset(path)
    n = len(ds)
    return {
        "rows": n,
        "prompts": len({r["prompt_index"] for r in ds}),
        "mean_reward": sum(float(r["reward"]) for r in ds) / n if n else 0.0,
        "finished": sum(r["finish"] != "length" for r in ds) / n if n else 0.0,
        "skipped": ds.skipped,
    }
