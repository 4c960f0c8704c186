"""Choosing training rows from a trajectory dataset: OREO's balanced selection and DPO pairs.

Pure functions over rows (dicts with at least ``prompt_index``, ``sample_index`` and ``reward``;
the rows of :class:`lit_reason.data.trajectories.TrajectoryDataset`). Rows are grouped by prompt
(``(split, prompt_index)``); a row is POSITIVE when its reward is > 0 (correct under both the {0,1}
and the {-1,+1} conventions) and negative otherwise.

Randomness is per prompt: each prompt's draw uses its own generator seeded by ``(seed, split,
prompt_index)``, so the choice for a prompt depends neither on the order of the rows nor on the
other prompts in the list. Outputs are in prompt order (then sample order).

OREO's data rule (arXiv 2412.16145, App. A.1; docs/oreo.md, "Data and targets"):

* 7B setting: keep at most 4 positive and at most 4 negative samples per query, with
  #pos <= #neg, but at least 1 positive if there is any (:func:`balanced_selection`).
* DPO: at most 6 (1.5B) or 10 (7B) (chosen, rejected) pairs per query, drawn without replacement
  from all its (positive, negative) combinations (:func:`dpo_pairs`).
"""

from __future__ import annotations

import random
from typing import Any, Sequence


def is_positive(row: dict) -> bool:
    """A row is positive (correct) when its reward is > 0."""
    return float(row["reward"]) > 0


def group_by_prompt(rows: Sequence[dict]) -> dict[tuple[Any, int], list[dict]]:
    """Rows grouped by ``(split, prompt_index)`` in prompt order, each group in sample order."""
    groups: dict[tuple[Any, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("split"), int(r["prompt_index"])), []).append(r)
    ordered = sorted(groups, key=lambda k: (str(k[0]), k[1]))
    return {k: sorted(groups[k], key=lambda r: int(r["sample_index"])) for k in ordered}


def _rng(seed: int, key: tuple[Any, int]) -> random.Random:
    # seeding with a str is deterministic across processes (no hash randomisation)
    return random.Random(f"{seed}/{key[0]}/{key[1]}")


def balanced_counts(num_pos: int, num_neg: int, max_pos: int = 4, max_neg: int = 4) -> tuple[int, int]:
    """How many positives and negatives one prompt keeps.

    ``neg = min(num_neg, max_neg)``, ``pos = min(num_pos, max_pos, neg)``, then at least one
    positive when the prompt has any (so an all-positive prompt keeps exactly one row, and a prompt
    with positives and a single negative keeps one of each).
    """
    neg = min(num_neg, max_neg)
    pos = min(num_pos, max_pos, neg)
    if num_pos > 0 and max_pos > 0 and pos == 0:
        pos = 1
    return pos, neg


def balanced_selection(rows: Sequence[dict], max_pos: int = 4, max_neg: int = 4, seed: int = 0) -> list[dict]:
    """OREO's balanced subset: per prompt at most ``max_pos`` positives and ``max_neg`` negatives,
    with #pos <= #neg, but at least one positive when the prompt has any.

    Args:
        rows: Trajectory rows (``prompt_index``, ``sample_index``, ``reward``; ``split`` optional).
        max_pos: Positives kept per prompt at most.
        max_neg: Negatives kept per prompt at most.
        seed: Seed of the per-prompt draws; the same seed gives the same subset.

    Returns:
        The kept rows, in prompt then sample order.
    """
    if max_pos < 0 or max_neg < 0:
        raise ValueError(f"max_pos and max_neg must be >= 0, got {max_pos}, {max_neg}")
    kept: list[dict] = []
    for key, group in group_by_prompt(rows).items():
        pos = [r for r in group if is_positive(r)]
        neg = [r for r in group if not is_positive(r)]
        n_pos, n_neg = balanced_counts(len(pos), len(neg), max_pos, max_neg)
        rng = _rng(seed, key)
        chosen = rng.sample(pos, n_pos) + rng.sample(neg, n_neg)
        kept.extend(sorted(chosen, key=lambda r: int(r["sample_index"])))
    return kept


def dpo_pairs(rows: Sequence[dict], max_pairs: int = 6, seed: int = 0) -> tuple[list[tuple[dict, dict]], dict]:
    """(chosen, rejected) pairs for DPO: per prompt up to ``max_pairs`` of its (positive, negative)
    combinations, drawn without replacement.

    Args:
        rows: Trajectory rows (``prompt_index``, ``sample_index``, ``reward``; ``split`` optional).
        max_pairs: Pairs per prompt at most.
        seed: Seed of the per-prompt draws.

    Returns:
        ``(pairs, stats)``: pairs in prompt order (within a prompt, by chosen then rejected sample
        index); stats ``prompts``, ``prompts_with_pairs``, ``prompts_all_positive``,
        ``prompts_all_negative`` (prompts that give no pair, counted, never dropped silently) and
        ``pairs``.

    Raises:
        ValueError: No prompt has both a correct and an incorrect response.
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    pairs: list[tuple[dict, dict]] = []
    stats = {"prompts": 0, "prompts_with_pairs": 0, "prompts_all_positive": 0, "prompts_all_negative": 0, "pairs": 0}
    for key, group in group_by_prompt(rows).items():
        stats["prompts"] += 1
        pos = [r for r in group if is_positive(r)]
        neg = [r for r in group if not is_positive(r)]
        if not pos:
            stats["prompts_all_negative"] += 1
            continue
        if not neg:
            stats["prompts_all_positive"] += 1
            continue
        combos = [(i, j) for i in range(len(pos)) for j in range(len(neg))]
        drawn = _rng(seed, key).sample(combos, min(max_pairs, len(combos)))
        pairs.extend((pos[i], neg[j]) for i, j in sorted(drawn))
        stats["prompts_with_pairs"] += 1
    stats["pairs"] = len(pairs)
    if not pairs:
        raise ValueError(
            f"no DPO pair: DPO needs at least one prompt with a correct and an incorrect response, but of "
            f"{stats['prompts']} prompt(s) {stats['prompts_all_negative']} are all-negative and "
            f"{stats['prompts_all_positive']} all-positive (collect more samples per prompt, or start from a "
            "stronger policy)"
        )
    return pairs, stats


__all__ = ["balanced_counts", "balanced_selection", "dpo_pairs", "group_by_prompt", "is_positive"]
