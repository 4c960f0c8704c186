"""Sampling one next reasoning step of many prefixes at once.

Shared by every component that expands a state by one step: value-guided beam search
(:mod:`lit_reason.search.beam`), step-level MCTS (:mod:`lit_reason.rollout.mcts`) and the ranking
test of :class:`~lit_reason.callbacks.ValueCalibration`. Generation stops at the splitter's
delimiter, and the continuation is cut right after its first step with
:func:`~lit_reason.rollout.trajectories.response_steps`, so "a step" means exactly what the
StepSplitter says everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lit_reason.rollout.sampler import Generation
from lit_reason.rollout.trajectories import response_steps
from lit_reason.steps import StepSplitter

__all__ = ["NextStep", "first_step", "sample_next_steps", "step_stop_strings"]


@dataclass
class NextStep:
    """One sampled next step of a prefix.

    Attributes:
        ids: Token ids of the step (the continuation cut after its first step; EOS included when
            the step ends the response).
        terminal: The step ends with EOS: the response is complete.
        capped: The step is unfinished because the per-call token limit ran out inside it.
        generated: Tokens the engine generated for it (>= ``len(ids)``; the cost of the sample).
    """

    ids: list[int]
    terminal: bool
    capped: bool
    generated: int


def step_stop_strings(splitter: StepSplitter) -> list[str]:
    """Stop strings that end the sampling of one step: the splitter's delimiter, else a newline."""
    return [splitter.delimiter or "\n"]


def first_step(tokenizer, splitter: StepSplitter, gen: Generation) -> NextStep:
    """Cuts a sampled continuation right after its first step (token granularity).

    Args:
        tokenizer: The policy's tokenizer.
        splitter: Defines the steps.
        gen: A continuation from the engine.

    Returns:
        The first step; it is terminal only when the continuation ended with EOS inside it.
    """
    _text, _step_ids, step_ends = response_steps(tokenizer, splitter, gen.ids)
    cut = step_ends[0] + 1 if step_ends else len(gen.ids)
    whole = cut == len(gen.ids)
    return NextStep(ids=list(gen.ids[:cut]), terminal=gen.finish == "eos" and whole,
                      capped=gen.finish == "length" and whole, generated=len(gen.ids))


def sample_next_steps(
    engine,
    splitter: StepSplitter,
    prefixes: Sequence[Sequence[int]],
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    desc: str = "next steps",
) -> list[NextStep]:
    """Samples ``k`` next steps of every prefix in one batched engine call.

    Args:
        engine: A rollout engine (``sample(prefixes, k, temperature=, top_p=, max_new_tokens=,
            stop_strings=, desc=)`` and ``tokenizer``).
        splitter: Defines the steps; its delimiter is the stop string.
        prefixes: N token-id lists (prompt ++ partial response).
        k: Steps per prefix.
        temperature: Sampling temperature (1.0 in OREO's search and VinePPO's ranking analysis).
        top_p: Nucleus mass.
        max_new_tokens: Token limit of one step (None: the engine's).
        desc: Progress-bar label.

    Returns:
        N * k steps, prefix-major: entries ``[i*k, (i+1)*k)`` continue prefix i.
    """
    gens = engine.sample(prefixes, k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         stop_strings=step_stop_strings(splitter), desc=desc)
    return [first_step(engine.tokenizer, splitter, g) for g in gens]
