"""From prompts to a graded, step-segmented :class:`TrajectoryBatch`."""

from __future__ import annotations

from typing import Sequence

import torch

from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.sampler import Generation, RolloutEngine
from lit_reason.steps import StepSplitter


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (no special tokens, so prompt + response re-tokenises consistently)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def response_steps(tokenizer, splitter: StepSplitter, ids: Sequence[int]) -> tuple[str, list[int], list[int]]:
    """Decoded text, per-token step ids and step ends of one response.

    A response with no text (EOS straight away) is one step owning all its tokens, so every
    response has at least one step and one state S_0.
    """
    text, step_ids, step_ends = splitter.token_steps(tokenizer, list(ids))
    if not step_ends:
        step_ids = [0] * len(ids)
        step_ends = [len(ids) - 1] if ids else []
    return text, step_ids, step_ends


def build_batch(
    tokenizer,
    splitter: StepSplitter,
    task,
    prompt_ids: Sequence[Sequence[int]],
    prompts: Sequence[str],
    examples: Sequence[dict],
    generations: Sequence[Generation],
    k: int,
) -> TrajectoryBatch:
    """Assembles generations (prompt-major, ``k`` per prompt) into a graded batch.

    Truncated responses (no EOS or stop string within the length limit) earn reward 0
    (docs/index.md, rewards), whatever their text says. An empty generation (length limit 0) is rejected.
    When every generation carries the sampler's log-probs (sampled, not greedy), they become the
    batch's ``old_logprobs`` ([B, L], 0 on padding): the behaviour policy's log-probs at the
    sampling temperature.
    """
    n = len(prompt_ids)
    if len(generations) != n * k:
        raise ValueError(f"expected {n * k} generations for {n} prompts x k={k}, got {len(generations)}")
    pad = tokenizer.pad_token_id
    P = max(len(p) for p in prompt_ids)
    L = max(max((len(g.ids) for g in generations), default=1), 1)
    rows = []
    for j, gen in enumerate(generations):
        if not gen.ids:
            raise ValueError(f"generation {j} is empty: the sampler produced no token")
        i = j // k
        text, step_ids, step_ends = response_steps(tokenizer, splitter, gen.ids)
        reward = float(task.reward(text, examples[i])) if gen.finished else 0.0
        rows.append((i, gen, text, step_ids, step_ends, reward))
    S = max(len(r[4]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, P + L), pad, dtype=torch.long)
    attention = torch.zeros((B, P + L), dtype=torch.long)
    response_mask = torch.zeros((B, L))
    step_id_t = torch.full((B, L), -1, dtype=torch.long)
    step_end_t = torch.full((B, S), -1, dtype=torch.long)
    with_logprobs = all(g.logprobs is not None for g in generations)
    old_logprobs = torch.zeros((B, L)) if with_logprobs else None
    for b, (i, gen, _text, step_ids, step_ends, _r) in enumerate(rows):
        p = prompt_ids[i]
        input_ids[b, P - len(p) : P] = torch.as_tensor(list(p))
        attention[b, P - len(p) : P] = 1
        m = len(gen.ids)
        input_ids[b, P : P + m] = torch.as_tensor(gen.ids)
        attention[b, P : P + m] = 1
        response_mask[b, :m] = 1
        step_id_t[b, :m] = torch.as_tensor(step_ids)
        step_end_t[b, : len(step_ends)] = torch.as_tensor(step_ends)
        if with_logprobs:
            old_logprobs[b, :m] = torch.as_tensor(gen.logprobs)
    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        step_ids=step_id_t,
        step_ends=step_end_t,
        num_steps=torch.tensor([len(r[4]) for r in rows], dtype=torch.long),
        rewards=torch.tensor([r[5] for r in rows]),
        finished=torch.tensor([r[1].finished for r in rows]),
        group_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        prompt_len=P,
        prompts=[prompts[r[0]] for r in rows],
        responses=[r[2] for r in rows],
        examples=[examples[r[0]] for r in rows],
        old_logprobs=old_logprobs,
    )


def rollout(
    engine: RolloutEngine, task, splitter: StepSplitter, examples: Sequence[dict], k: int = 1, **sample_kwargs
) -> TrajectoryBatch:
    """Samples ``k`` responses per example and returns the graded, step-segmented batch."""
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(engine.tokenizer, prompts)
    generations = engine.sample(prompt_ids, k, **sample_kwargs)
    return build_batch(engine.tokenizer, splitter, task, prompt_ids, prompts, examples, generations, k)
