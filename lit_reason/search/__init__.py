"""Test-time search: value-guided step beam search (OREO), usable with any value of a prefix."""

from lit_reason.search.beam import (
    BeamSearchResult,
    NextStep,
    ValueFn,
    first_step,
    sample_next_steps,
    step_stop_strings,
    value_guided_beam_search,
    value_model_fn,
)

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
