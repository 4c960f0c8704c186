"""Accuracy of a policy on a task: greedy pass@1, with K samples mean pass@1 and majority vote, and
with a value model the accuracy of value-guided step beam search (:func:`evaluate_beam_search`)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import encode_prompts
from lit_reason.search import value_guided_beam_search, value_model_fn


def _bind_tokenizer(task, tokenizer) -> None:
    """Chat-format tasks render prompts with the policy's chat template (no-op for plain ones)."""
    if hasattr(task, "use_tokenizer"):
        task.use_tokenizer(tokenizer)


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
    _bind_tokenizer(task, tokenizer)
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(tokenizer, prompts)
    records = _greedy_records(engine, tokenizer, task, examples, prompts, prompt_ids)
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


def _greedy_records(engine, tokenizer, task, examples, prompts, prompt_ids, **sample_kwargs) -> list[dict]:
    """Greedy response of each prompt, graded (a truncated response counts as wrong)."""
    greedy = engine.sample(prompt_ids, 1, temperature=0.0, desc="eval greedy", **sample_kwargs)
    records = []
    for e, prompt, gen in zip(examples, prompts, greedy):
        text = tokenizer.decode(gen.ids, skip_special_tokens=True)
        correct = gen.finished and task.reward(text, e) == 1.0
        records.append({"prompt": prompt, "reference": task.reference_answer(e), "response": text,
                        "answer": task.extract_answer(text), "finish": gen.finish, "correct": bool(correct)})
    return records


def format_table(result: dict, title: str) -> str:
    """A plain-text accuracy table for the terminal (of :func:`evaluate_policy` or
    :func:`evaluate_beam_search`)."""
    if result.get("search") == "beam":
        rows = [("examples", str(result["n"])),
                (f"beam search pass@1 (B={result['beam_size']}, max steps={result['max_steps']})",
                 f"{result['accuracy']:.4f}")]
        if "greedy_accuracy" in result:
            rows.append(("greedy pass@1", f"{result['greedy_accuracy']:.4f}"))
        rows += [("no finished answer (fallback)", str(result["fallbacks"])),
                 ("mean answer pool", f"{result['mean_pool_size']:.2f}"),
                 ("mean rounds", f"{result['mean_steps']:.2f}"),
                 ("tokens generated by the search", str(result["generated_tokens"]))]
    else:
        rows = [("examples", str(result["n"])), ("greedy pass@1", f"{result['accuracy']:.4f}")]
    if "pass@1_mean" in result:
        rows.append((f"mean pass@1 (K={result['samples']}, T={result['temperature']})", f"{result['pass@1_mean']:.4f}"))
        rows.append((f"majority vote (K={result['samples']})", f"{result['majority']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [title, "-" * (width + 12)] + [f"{k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------- value-guided search


def check_value_model_matches(value_dir, value_model, tokenizer, policy_label: str = "the policy",
                              policy_model=None) -> None:
    """Refuses a value model that does not read the policy's token ids the same way.

    The search feeds the policy's token ids straight into the value model, so both must share one
    vocabulary. When the value folder holds a tokenizer (``ValueModel.save(dir, tokenizer)``), its
    vocabulary and EOS id must equal the policy's; in any case the value model needs an embedding
    for every token id the policy can emit. A folder without a tokenizer whose embedding count
    fits is accepted with a warning (the vocabularies cannot be compared).

    Args:
        value_dir: The value-model folder (named in errors).
        value_model: The loaded :class:`~lit_reason.models.value.ValueModel`.
        tokenizer: The policy's tokenizer.
        policy_label: How errors name the policy (its name or folder).
        policy_model: The policy (its ``config.vocab_size`` bounds the ids it can sample).

    Raises:
        ValueError: Naming both the value folder and the policy, with the first difference.
    """
    where = f"value model {value_dir} does not match the policy {policy_label}"
    value_dir = Path(value_dir)
    if (value_dir / "tokenizer.json").is_file() or (value_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        value_tok = AutoTokenizer.from_pretrained(str(value_dir))
        mine, theirs = value_tok.get_vocab(), tokenizer.get_vocab()
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:1]
            example = ""
            if diff:
                token = diff[0][0]
                example = f"; e.g. token {token!r} is id {mine.get(token)} in the value model's and " \
                          f"{theirs.get(token)} in the policy's"
            raise ValueError(f"{where}: the tokenizers differ ({len(mine)} tokens in the value model's, "
                             f"{len(theirs)} in the policy's{example})")
        if value_tok.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"{where}: EOS id {value_tok.eos_token_id} in the value model's tokenizer, "
                             f"{tokenizer.eos_token_id} in the policy's")
    else:
        warnings.warn(f"value model {value_dir} has no tokenizer saved with it, so its vocabulary cannot be "
                      f"compared with the policy {policy_label}'s; only the embedding count is checked "
                      "(save it with ValueModel.save(dir, tokenizer))", stacklevel=2)
    n_value = value_model.trunk.get_input_embeddings().num_embeddings
    n_policy = len(tokenizer)
    if policy_model is not None:
        n_policy = max(n_policy, int(getattr(policy_model.config, "vocab_size", 0) or 0))
    if n_value < n_policy:
        raise ValueError(f"{where}: it embeds {n_value} token ids, the policy's vocabulary has {n_policy}")


def load_search_value_fn(value_dir, tokenizer, policy_label: str = "the policy", policy_model=None,
                         dtype: str | None = None, batch_size: int = 64):
    """Loads a value-model folder for :func:`evaluate_beam_search`, checked against the policy.

    Args:
        value_dir: A folder written by :meth:`~lit_reason.models.value.ValueModel.save`.
        tokenizer: The policy's tokenizer (its pad id pads the value model's batches).
        policy_label: How errors name the policy.
        policy_model: The policy; the value model is moved to its device.
        dtype: Parameter dtype of the value model (None keeps the checkpoint's).
        batch_size: Sequences per value forward pass.

    Returns:
        ``(value_fn, value_model)``: a :data:`~lit_reason.search.ValueFn` and the model behind it.

    Raises:
        FileNotFoundError / ValueError naming the folder: not a value model, or one whose
        vocabulary does not match the policy's (:func:`check_value_model_matches`).
    """
    from lit_reason.models.value import ValueModel

    if not Path(value_dir).expanduser().is_dir():
        raise FileNotFoundError(f"value model folder {value_dir} does not exist")
    value_model = ValueModel.load(value_dir, dtype=dtype)
    check_value_model_matches(value_dir, value_model, tokenizer, policy_label, policy_model)
    if policy_model is not None:
        value_model.to(next(policy_model.parameters()).device)
    return value_model_fn(value_model, tokenizer.pad_token_id, batch_size=batch_size), value_model


def grade_search_results(task, examples: Sequence[dict], prompts: Sequence[str], results) -> list[dict]:
    """One record per example for search results (:class:`~lit_reason.search.BeamSearchResult`).

    A result without a finished response (``finish="length"``, the search's fallback) counts as
    wrong whatever its text says (docs/index.md, rewards).
    """
    records = []
    for e, prompt, res in zip(examples, prompts, results):
        correct = res.finish == "eos" and task.reward(res.text, e) == 1.0
        records.append({"prompt": prompt, "reference": task.reference_answer(e), "response": res.text,
                        "answer": task.extract_answer(res.text), "finish": res.finish, "correct": bool(correct),
                        "value": res.value, "pool_size": res.pool_size, "steps": res.steps,
                        "candidates": res.candidates, "generated_tokens": res.generated_tokens,
                        "truncated": res.truncated, "fallback": res.fallback})
    return records


def evaluate_beam_search(
    model,
    tokenizer,
    task,
    examples: Sequence[dict],
    value_fn,
    beam_size: int = 4,
    splitter=None,
    max_steps: int = 20,
    max_new_tokens: int = 128,
    max_step_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    greedy: bool = True,
    progress: bool = False,
    engine=None,
) -> dict:
    """Accuracy of value-guided step beam search (OREO's test-time search) on ``examples``.

    Args:
        model: Causal LM (the policy); unused when ``engine`` is given.
        tokenizer: Its tokenizer.
        task: A :class:`lit_reason.tasks.Task`.
        examples: Rows of the task's data.
        value_fn: Values of full token sequences (:data:`~lit_reason.search.ValueFn`), e.g. from
            :func:`load_search_value_fn` or :func:`~lit_reason.search.value_model_fn`.
        beam_size: B (B x B candidates per round, top B kept).
        splitter: A :class:`~lit_reason.steps.StepSplitter` (default: newline steps).
        max_steps: Rounds at most.
        max_new_tokens: Length limit of a response, as for greedy decoding.
        max_step_tokens: Length limit of one step (default: ``max_new_tokens``).
        temperature: Step sampling temperature (1.0 in OREO).
        top_p: Nucleus mass of step sampling.
        batch_size: Sequences decoded together.
        seed: Sampling seed.
        greedy: Also evaluate greedy decoding, reported as ``greedy_accuracy`` and per record.
        progress: Progress bars.
        engine: Sample with this engine instead of a ``RolloutEngine`` over ``model`` (a vLLM
            backend, or a stand-in in tests).

    Returns:
        ``{"search": "beam", "n", "accuracy" (of the search), "beam_size", "max_steps",
        "max_new_tokens", "max_step_tokens", "temperature", "top_p", "fallbacks" (examples without
        a finished response), "mean_pool_size", "mean_steps", "generated_tokens" (search total),
        "records": [...]}`` plus, with ``greedy``, ``"greedy_accuracy"`` and a ``"greedy"``
        record (response, answer, finish, correct) in every record.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if engine is None:
        engine = RolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, batch_size=batch_size, seed=seed, progress=progress)
    _bind_tokenizer(task, tokenizer)
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(tokenizer, prompts)
    results = value_guided_beam_search(engine, value_fn, prompt_ids, beam_size, splitter=splitter,
                                       max_steps=max_steps, max_new_tokens=max_new_tokens,
                                       max_step_tokens=max_step_tokens, temperature=temperature, top_p=top_p)
    records = grade_search_results(task, examples, prompts, results)
    n = len(records)
    out: dict = {
        "search": "beam", "n": n, "accuracy": sum(r["correct"] for r in records) / n, "beam_size": beam_size,
        "max_steps": max_steps, "max_new_tokens": max_new_tokens,
        "max_step_tokens": max_new_tokens if max_step_tokens is None else max_step_tokens,
        "temperature": temperature, "top_p": top_p, "fallbacks": sum(r["fallback"] for r in records),
        "mean_pool_size": sum(r["pool_size"] for r in records) / n,
        "mean_steps": sum(r["steps"] for r in records) / n,
        "generated_tokens": sum(r["generated_tokens"] for r in records),
    }
    if greedy:
        greedy_records = _greedy_records(engine, tokenizer, task, examples, prompts, prompt_ids,
                                         max_new_tokens=max_new_tokens, stop_strings=())
        for rec, g in zip(records, greedy_records):
            rec["greedy"] = {k: g[k] for k in ("response", "answer", "finish", "correct")}
        out["greedy_accuracy"] = sum(g["correct"] for g in greedy_records) / n
    out["records"] = records
    return out
