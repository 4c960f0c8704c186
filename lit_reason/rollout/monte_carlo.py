"""Monte Carlo state values: V(S) = mean outcome of K fresh continuations of S (docs/vineppo.md).

States are step-boundary prefixes S_k = x ++ sigma_0 ++ ... ++ sigma_{k-1} of sampled responses
(S_0 = the prompt). Identical prefixes are de-duplicated and share one estimate, so S_0 is rolled
out once per prompt however many responses the prompt has; each unique prefix is encoded once for
its K continuations (``RolloutEngine.continue_from``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.sampler import RolloutEngine


def step_states(batch: TrajectoryBatch, max_steps: int | None = None) -> list[tuple[int, int, list[int], list[int]]]:
    """Lists the step-boundary states of a batch.

    Args:
        batch: Trajectories with ``step_ends``/``num_steps``.
        max_steps: Only states S_k with k < max_steps (VinePPO's ``max_step_for_value_estimation``).

    Returns:
        ``(row, k, prompt_ids, partial_response_ids)`` for each state S_k, k < T (S_T is terminal
        and never rolled out).
    """
    out = []
    for b in range(len(batch)):
        prompt = batch.prompt_ids[b][batch.attention_mask[b, : batch.prompt_len].bool()].tolist()
        response = batch.response_ids[b].tolist()
        T = int(batch.num_steps[b])
        limit = T if max_steps is None else min(T, max_steps)
        for k in range(limit):
            end = 0 if k == 0 else int(batch.step_ends[b, k - 1]) + 1
            out.append((b, k, prompt, response[:end]))
    return out


def mc_values(
    engine: RolloutEngine,
    task,
    prompt_ids: Sequence[Sequence[int]],
    partial_ids: Sequence[Sequence[int]],
    examples: Sequence[dict],
    k: int,
    **sample_kwargs,
) -> torch.Tensor:
    """Monte Carlo value of each state ``prompt + partial``.

    Args:
        engine: Sampler of the current policy.
        task: Grades ``partial + continuation`` against the example.
        prompt_ids: N prompt token lists.
        partial_ids: N partial-response token lists (may be empty: S_0).
        examples: N task rows (the reference answers).
        k: Continuations per state (VinePPO's K); must be >= 1.
        **sample_kwargs: Passed to ``continue_from`` (temperature, max_new_tokens ...).

    Returns:
        [N] float tensor of mean rewards in [0, 1] (truncated continuations score 0). A state
        whose partial response already ends with EOS is terminal: its value is its own reward.
    """
    if k < 1:
        raise ValueError(f"Monte Carlo values need k >= 1 continuations per state, got k={k}")
    if not (len(prompt_ids) == len(partial_ids) == len(examples)):
        raise ValueError("prompt_ids, partial_ids and examples must have the same length")
    tok = engine.tokenizer
    values = torch.zeros(len(prompt_ids))
    keys: dict[tuple[int, ...], int] = {}
    unique: list[tuple[list[int], list[int], dict]] = []
    members: list[list[int]] = []
    for i, (p, part, ex) in enumerate(zip(prompt_ids, partial_ids, examples)):
        if len(part) and part[-1] == tok.eos_token_id:
            # a terminal state (its response already ended): nothing to sample, V = its own reward
            values[i] = float(task.reward(tok.decode(list(part), skip_special_tokens=True), ex))
            continue
        key = tuple(p) + (-1,) + tuple(part)
        if key not in keys:
            keys[key] = len(unique)
            unique.append((list(p), list(part), ex))
            members.append([])
        members[keys[key]].append(i)
    if not unique:
        return values
    gens = engine.continue_from([p + part for p, part, _ in unique], k, **sample_kwargs)
    for u, (_p, part, ex) in enumerate(unique):
        total = 0.0
        for g in gens[u * k : (u + 1) * k]:
            if g.finished:
                total += float(task.reward(tok.decode(part + g.ids, skip_special_tokens=True), ex))
        values[members[u]] = total / k
    return values


def mc_step_values(
    engine: RolloutEngine, task, batch: TrajectoryBatch, k: int, max_steps: int | None = None, **sample_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """V(S_k) for every step-boundary state of a batch.

    Returns:
        ``(step_values [B, S], estimated [B, S] bool)``; states not estimated (k >= max_steps, or
        k >= T) hold 0 and ``estimated`` False, for ``fill_values_backward``.
    """
    states = step_states(batch, max_steps)
    values = mc_values(engine, task, [s[2] for s in states], [s[3] for s in states],
                       [batch.examples[s[0]] for s in states], k, **sample_kwargs)
    S = batch.step_ends.shape[1]
    step_values = torch.zeros(len(batch), S)
    estimated = torch.zeros(len(batch), S, dtype=torch.bool)
    for (b, kk, _p, _part), v in zip(states, values.tolist()):
        step_values[b, kk] = v
        estimated[b, kk] = True
    return step_values, estimated
