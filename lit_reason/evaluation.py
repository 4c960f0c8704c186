"""Accuracy of a policy on a task: greedy pass@1, and with K samples mean pass@1 and majority vote."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import encode_prompts


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent extracted answer (ties: the earliest sample's), ignoring None."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def evaluate_policy(
    model,
    tokenizer,
    task,
    examples: Sequence[dict],
    samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Evaluates ``model`` on ``examples``.

    Args:
        model: Causal LM.
        tokenizer: Its tokenizer.
        task: A :class:`lit_reason.tasks.Task`.
        examples: Rows of the task's data.
        samples: K sampled responses per example in addition to the greedy one (0 = greedy only).
        temperature: Sampling temperature of the K samples.
        top_p: Nucleus mass of the K samples.
        max_new_tokens: Length limit; a response cut by it counts as wrong.
        batch_size: Sequences per forward pass.
        seed: Sampling seed.
        progress: Progress bars.

    Returns:
        ``{"accuracy": greedy pass@1, "n": len(examples), "records": [...]}`` plus, with samples,
        ``"pass@1_mean"`` (mean over examples of the fraction of correct samples) and
        ``"majority"`` (accuracy of the majority-vote answer).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    engine = RolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           batch_size=batch_size, seed=seed, progress=progress)
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(tokenizer, prompts)
    greedy = engine.sample(prompt_ids, 1, temperature=0.0, desc="eval greedy")
    records = []
    for e, prompt, gen in zip(examples, prompts, greedy):
        text = tokenizer.decode(gen.ids, skip_special_tokens=True)
        correct = gen.finished and task.reward(text, e) == 1.0
        records.append({"prompt": prompt, "reference": task.reference_answer(e), "response": text,
                        "answer": task.extract_answer(text), "finish": gen.finish, "correct": bool(correct)})
    result: dict = {"n": len(examples), "accuracy": sum(r["correct"] for r in records) / len(records)}
    if samples > 0:
        sampled = engine.sample(prompt_ids, samples, desc=f"eval {samples} samples")
        pass1, votes = 0.0, 0
        for i, (e, rec) in enumerate(zip(examples, records)):
            gens = sampled[i * samples : (i + 1) * samples]
            texts = [tokenizer.decode(g.ids, skip_special_tokens=True) for g in gens]
            ok = [g.finished and task.reward(t, e) == 1.0 for g, t in zip(gens, texts)]
            answers = [task.extract_answer(t) if g.finished else None for g, t in zip(gens, texts)]
            vote = majority_answer(answers)
            vote_ok = vote is not None and any(a == vote and o for a, o in zip(answers, ok))
            rec.update({"samples": texts, "samples_correct": ok, "majority_answer": vote, "majority_correct": vote_ok})
            pass1 += sum(ok) / samples
            votes += vote_ok
        result["pass@1_mean"] = pass1 / len(examples)
        result["majority"] = votes / len(examples)
        result["samples"] = samples
        result["temperature"] = temperature
    result["records"] = records
    return result


def format_table(result: dict, title: str) -> str:
    """A plain-text accuracy table for the terminal."""
    rows = [("examples", str(result["n"])), ("greedy pass@1", f"{result['accuracy']:.4f}")]
    if "pass@1_mean" in result:
        rows.append((f"mean pass@1 (K={result['samples']}, T={result['temperature']})", f"{result['pass@1_mean']:.4f}"))
        rows.append((f"majority vote (K={result['samples']})", f"{result['majority']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)
