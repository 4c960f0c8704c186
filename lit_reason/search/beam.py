"""Value-guided step-level beam search: OREO's test-time search (arXiv 2412.16145, Sec. 4.4; docs/oreo.md).

The search works with *any* value of a token prefix: OREO's or DQO's value model, DVPO's global
value model, a PPO critic, Monte Carlo estimates. It only needs ``value_fn``, a callable from full
token sequences (prompt ++ partial response) to one value each; :func:`value_model_fn` adapts a
:class:`~lit_reason.models.value.ValueModel`.

Algorithm, as in docs/oreo.md::

    beams = [prompt]
    for round in range(max_steps):
        candidates = [b + sample_step(b) for b in beams for _ in range(B)]   # T = 1.0, stop at the step delimiter
        finished (EOS) candidates -> answer pool, scored by value_fn
        unfinished candidates     -> scored by value_fn at the last token; beams = their top B
        stop when no unfinished beam is left
    answer = argmax of value_fn over the answer pool

Details that the source leaves open, decided here:

* Round 1 expands the single beam (the prompt), so it has B candidates; later rounds have up to
  B x B (fewer when fewer than B unfinished candidates survived).
* One next step is sampled with the splitter's delimiter as stop string (``"\\n"`` for the MATH
  policy, which has no single delimiter) and cut right after the first step of the continuation
  (:func:`sample_next_steps`, shared with the ranking test of ``ValueCalibration``).
* A finished candidate is valued on ``prompt ++ response`` *without* its final EOS, i.e. at the
  state whose next action is EOS. The value models of lit_reason are trained on the states before
  every response token (``ValueModel.response_values``), never on the position of the EOS itself,
  so the value there is untrained. ``value_at_eos=True`` reads it at the EOS instead.
* Ties (equal values) go to the earlier candidate: earlier round, then beam order, then sample
  order, so the search is deterministic given the samples. Duplicates are not merged (as in the
  source): identical steps may occupy several beams.
* Length: ``max_new_tokens`` bounds the whole response (the same limit as greedy decoding, so the
  two compare at equal budget); ``max_step_tokens`` bounds one step (a step cut by it is continued
  in the next round). A candidate that reaches ``max_new_tokens`` without EOS is truncated: it is
  neither extended nor put in the pool (it counts in ``truncated``).
* Fallback: when a prompt's pool is still empty at the end (``max_steps`` reached, or every
  candidate truncated), its result is the highest-valued unfinished candidate of its last round,
  with ``finish="length"`` (``fallback`` is True). Graders count it as wrong
  (docs/index.md, rewards).

Batching: every round makes one ``engine.sample`` call over all beams of all prompts still
searching (``k = B`` continuations each, prefix-major) and one ``value_fn`` call over all their
candidates, finished and unfinished together. With a shared sampling generator (``RolloutEngine``),
a prompt's samples depend on the other rows of the batch, so the same seed with another batching
gives other (identically distributed) samples; a deterministic engine (temperature 0, or one whose
samples depend only on the prefix) gives identical results however the prompts are batched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from lit_reason.rollout.sampler import Generation, eval_mode
from lit_reason.rollout.next_step import NextStep, first_step, sample_next_steps, step_stop_strings
from lit_reason.steps import StepSplitter

__all__ = [
    "BeamSearchResult",
    "NextStep",
    "ValueFn",
    "first_step",
    "sample_next_steps",
    "step_stop_strings",
    "value_guided_beam_search",
    "value_model_fn",
]

#: Values of full token sequences: N id lists (prompt ++ partial response) -> a [N] tensor.
ValueFn = Callable[[list[list[int]]], torch.Tensor]


class SamplingEngine(Protocol):
    """What the search needs of a rollout engine (``RolloutEngine``, or a vLLM-backed one)."""

    tokenizer: object

    def sample(self, prefixes: Sequence[Sequence[int]], k: int = 1, **kwargs) -> list[Generation]: ...


# ---------------------------------------------------------------------------------- values


def value_model_fn(value_model, pad_token_id: int, batch_size: int = 64) -> ValueFn:
    """Adapts a :class:`~lit_reason.models.value.ValueModel` to a :data:`ValueFn`.

    Args:
        value_model: The value model (on any device; it is run in eval mode, without gradients,
            and its train/eval flag is restored).
        pad_token_id: Pad id of the (shared) tokenizer.
        batch_size: Sequences per forward pass.

    Returns:
        ``fn(sequences) -> [N]`` float32 CPU tensor: the value at the last token of each sequence.
    """

    def fn(sequences: list[list[int]]) -> torch.Tensor:
        with torch.no_grad(), eval_mode(value_model):
            return value_model.values_of(sequences, pad_token_id, batch_size=batch_size).float().cpu()

    return fn


def _call_value_fn(value_fn: ValueFn, sequences: list[list[int]]) -> list[float]:
    out = torch.as_tensor(value_fn(sequences)).detach().to("cpu", torch.float64)
    if out.numel() != len(sequences) or out.squeeze().dim() > 1:
        raise ValueError(f"value_fn returned shape {tuple(out.shape)} for {len(sequences)} sequences; "
                         "it must return one value per sequence ([N])")
    values = out.reshape(-1).tolist()
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        raise ValueError(f"value_fn returned {bad} non-finite value(s) out of {len(values)}")
    return values


# ---------------------------------------------------------------------------------- search


@dataclass
class BeamSearchResult:
    """The outcome of the search for one prompt.

    Attributes:
        response_ids: The chosen response (EOS included when it is finished).
        text: Its text (special tokens skipped).
        value: Its value (for a finished response: at the state before EOS, see the module doc).
        finish: ``"eos"`` (the argmax of the answer pool) or ``"length"`` (the pool was empty: the
            best unfinished candidate of the last round; counts as wrong).
        pool_size: Finished candidates seen (the answer pool).
        steps: Rounds in which the prompt was expanded.
        candidates: Candidates scored over all rounds.
        generated_tokens: Tokens the engine generated for this prompt (all candidates).
        truncated: Candidates dropped for reaching ``max_new_tokens`` without EOS.
    """

    response_ids: list[int]
    text: str
    value: float
    finish: str
    pool_size: int
    steps: int
    candidates: int
    generated_tokens: int
    truncated: int

    @property
    def fallback(self) -> bool:
        """True when no finished response was found (the result is an unfinished candidate)."""
        return self.finish != "eos"

    def to_dict(self) -> dict:
        return {**asdict(self), "fallback": self.fallback}


@dataclass
class _Search:
    """Per-prompt bookkeeping."""

    beams: list[list[int]] = field(default_factory=lambda: [[]])  # unfinished responses; [[]] = the prompt
    best: tuple[float, list[int]] | None = None  # argmax of the answer pool so far
    last_unfinished: tuple[float, list[int]] | None = None  # best unfinished candidate of the last round
    pool: int = 0
    steps: int = 0
    candidates: int = 0
    generated: int = 0
    truncated: int = 0


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def value_guided_beam_search(
    engine: SamplingEngine,
    value_fn: ValueFn,
    prompt_ids: Sequence[Sequence[int]],
    beam_size: int,
    splitter: StepSplitter | None = None,
    max_steps: int = 20,
    max_new_tokens: int = 512,
    max_step_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    value_at_eos: bool = False,
) -> list[BeamSearchResult]:
    """Value-guided step beam search over a batch of prompts (algorithm: see the module doc).

    Args:
        engine: A rollout engine (:class:`~lit_reason.rollout.sampler.RolloutEngine` or anything
            with the same ``sample`` and ``tokenizer``).
        value_fn: Values of full token sequences, ``list[list[int]]`` of N -> [N] tensor.
        prompt_ids: P prompts as token-id lists (non-empty).
        beam_size: B: beams kept per prompt, and steps sampled per beam (B x B candidates).
        splitter: Defines the steps (default: newline steps).
        max_steps: Rounds at most (20 in OREO).
        max_new_tokens: Length limit of a response (tokens).
        max_step_tokens: Length limit of one step (default: ``max_new_tokens``).
        temperature: Step sampling temperature (1.0 in OREO).
        top_p: Nucleus mass of step sampling.
        value_at_eos: Value finished candidates at their EOS token instead of the token before.

    Returns:
        P results, in prompt order.

    Raises:
        ValueError: A bad ``beam_size``/``max_steps``/length limit, an empty prompt, or a
            ``value_fn`` that returns the wrong number of values or a non-finite one.
    """
    _check_int("beam_size", beam_size, 1)
    _check_int("max_steps", max_steps, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    max_step_tokens = max_new_tokens if max_step_tokens is None else max_step_tokens
    _check_int("max_step_tokens", max_step_tokens, 1)
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    splitter = splitter or StepSplitter()
    tokenizer = engine.tokenizer
    prompts = [list(p) for p in prompt_ids]
    states = [_Search() for _ in prompts]

    for round_index in range(max_steps):
        active = [i for i, s in enumerate(states) if s.beams]
        if not active:
            break
        owners = [i for i in active for _ in states[i].beams]
        bases = [beam for i in active for beam in states[i].beams]
        # one call for every beam of every prompt; a beam near the length limit is cut below
        cap = min(max_step_tokens, max(max_new_tokens - len(b) for b in bases))
        steps = sample_next_steps(engine, splitter, [prompts[i] + b for i, b in zip(owners, bases)], beam_size,
                                  temperature=temperature, top_p=top_p, max_new_tokens=cap,
                                  desc=f"beam search round {round_index + 1}")
        cands = []  # (prompt, response, terminal, truncated), beam-major then sample order
        for j, step in enumerate(steps):
            i, response = owners[j // beam_size], bases[j // beam_size] + step.ids
            states[i].generated += step.generated
            terminal = step.terminal and len(response) <= max_new_tokens
            response = response[:max_new_tokens]
            cands.append((i, response, terminal, not terminal and len(response) >= max_new_tokens))
        seqs = [prompts[i] + (r if not t or value_at_eos else r[:-1]) for i, r, t, _ in cands]
        values = _call_value_fn(value_fn, seqs)

        by_prompt: dict[int, list] = {i: [] for i in active}
        for order, ((i, response, terminal, truncated), v) in enumerate(zip(cands, values)):
            by_prompt[i].append((v, order, response, terminal, truncated))
        for i, group in by_prompt.items():
            st = states[i]
            st.steps += 1
            st.candidates += len(group)
            alive, best_unfinished = [], None
            for v, order, response, terminal, truncated in group:
                if terminal:
                    st.pool += 1
                    if st.best is None or v > st.best[0]:  # strict: ties keep the earlier answer
                        st.best = (v, response)
                    continue
                if best_unfinished is None or v > best_unfinished[0]:
                    best_unfinished = (v, response)
                if truncated:
                    st.truncated += 1
                else:
                    alive.append((v, order, response))
            alive.sort(key=lambda c: (-c[0], c[1]))
            st.beams = [response for _v, _o, response in alive[:beam_size]]
            if best_unfinished is not None:
                st.last_unfinished = best_unfinished

    results = []
    for st in states:
        finish = "eos" if st.best is not None else "length"
        value, ids = st.best if st.best is not None else st.last_unfinished
        results.append(BeamSearchResult(
            response_ids=list(ids), text=tokenizer.decode(ids, skip_special_tokens=True), value=float(value),
            finish=finish, pool_size=st.pool, steps=st.steps, candidates=st.candidates,
            generated_tokens=st.generated, truncated=st.truncated,
        ))
    return results
