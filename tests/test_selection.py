"""OREO balanced selection and DPO pairs (docs/oreo.md) on hand-made rows."""

from __future__ import annotations

import random
from collections import Counter
from math import comb

import pytest

from lit_reason.data.selection import balanced_counts, balanced_selection, dpo_pairs, group_by_prompt


def make_rows(spec: dict[int, tuple[int, int]], split: str = "train", neg_reward: float = 0.0) -> list[dict]:
    """``{prompt: (num_pos, num_neg)}`` -> rows; positives first in sample order."""
    rows = []
    for p, (n_pos, n_neg) in spec.items():
        rewards = [1.0] * n_pos + [neg_reward] * n_neg
        for s, r in enumerate(rewards):
            rows.append({"prompt_index": p, "split": split, "sample_index": s, "reward": r})
    return rows


def per_prompt(rows):
    out = {}
    for r in rows:
        pos, neg = out.get(r["prompt_index"], (0, 0))
        out[r["prompt_index"]] = (pos + (r["reward"] > 0), neg + (r["reward"] <= 0))
    return out


SPEC = {
    0: (10, 6),   # many of both: 4 pos, 4 neg
    1: (6, 2),    # few negatives: pos capped by #neg -> 2, 2
    2: (1, 15),   # one positive: 1, 4
    3: (0, 16),   # all negative: 0, 4
    4: (16, 0),   # all positive: at least one positive -> 1, 0
    5: (3, 1),    # #neg = 1 -> 1, 1
    6: (2, 3),    # under both caps -> 2, 3
}
EXPECTED = {0: (4, 4), 1: (2, 2), 2: (1, 4), 3: (0, 4), 4: (1, 0), 5: (1, 1), 6: (2, 3)}


def test_balanced_counts_rule():
    for p, (n_pos, n_neg) in SPEC.items():
        assert balanced_counts(n_pos, n_neg) == EXPECTED[p], p
    assert balanced_counts(0, 0) == (0, 0)
    assert balanced_counts(5, 0, max_pos=4, max_neg=0) == (1, 0)  # at least one positive, even with max_neg=0
    assert balanced_counts(5, 9, max_pos=2, max_neg=3) == (2, 3)


def test_balanced_selection_exact_counts_and_pos_le_neg_rule():
    rows = make_rows(SPEC)
    kept = balanced_selection(rows, max_pos=4, max_neg=4, seed=0)
    assert per_prompt(kept) == {p: c for p, c in EXPECTED.items() if sum(c)}
    assert len(kept) == sum(sum(c) for c in EXPECTED.values()) == 8 + 4 + 5 + 4 + 1 + 2 + 5
    for p, (pos, neg) in per_prompt(kept).items():
        n_pos = SPEC[p][0]
        # #pos <= #neg, except the one positive a prompt with positives always keeps
        assert pos <= neg or (pos == 1 and n_pos > 0)
        assert pos <= 4 and neg <= 4
        assert pos >= 1 if n_pos else pos == 0
    # rows are returned whole, in prompt then sample order, without duplicates
    keys = [(r["prompt_index"], r["sample_index"]) for r in kept]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(r in rows for r in kept)


def test_balanced_selection_is_deterministic_and_order_independent():
    rows = make_rows(SPEC)
    a = balanced_selection(rows, seed=3)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert balanced_selection(shuffled, seed=3) == a
    # a prompt's choice does not depend on the other prompts in the list
    only0 = [r for r in rows if r["prompt_index"] == 0]
    assert balanced_selection(only0, seed=3) == [r for r in a if r["prompt_index"] == 0]
    # another seed draws other samples (prompt 0 keeps 4 of 10 positives: C(10,4)=210 choices)
    draws = {tuple(r["sample_index"] for r in balanced_selection(only0, seed=s)) for s in range(10)}
    assert len(draws) > 1


def test_balanced_selection_pm1_rewards_and_caps():
    rows = make_rows(SPEC, neg_reward=-1.0)
    assert per_prompt(balanced_selection(rows)) == {p: c for p, c in EXPECTED.items() if sum(c)}
    small = balanced_selection(make_rows({0: (9, 9)}), max_pos=2, max_neg=3)
    assert per_prompt(small) == {0: (2, 3)}
    with pytest.raises(ValueError):
        balanced_selection(rows, max_pos=-1)


def test_dpo_pairs_counts_without_replacement_and_stats():
    spec = {0: (3, 4), 1: (1, 2), 2: (0, 5), 3: (4, 0), 4: (2, 2), 5: (0, 3)}
    rows = make_rows(spec)
    pairs, stats = dpo_pairs(rows, max_pairs=6, seed=0)
    per = Counter(c["prompt_index"] for c, _ in pairs)
    assert per == {0: 6, 1: 2, 4: 4}  # min(6, pos * neg) per prompt
    assert stats == {"prompts": 6, "prompts_with_pairs": 3, "prompts_all_positive": 1, "prompts_all_negative": 2,
                     "pairs": 12}
    for chosen, rejected in pairs:
        assert chosen["reward"] > 0 >= rejected["reward"]
        assert chosen["prompt_index"] == rejected["prompt_index"]
    keys = [(c["prompt_index"], c["sample_index"], r["sample_index"]) for c, r in pairs]
    assert len(set(keys)) == len(keys)  # without replacement
    assert keys == sorted(keys)
    # a prompt with fewer combinations than max_pairs gives all of them
    assert {(c["sample_index"], r["sample_index"]) for c, r in pairs if c["prompt_index"] == 4} == {
        (0, 2), (0, 3), (1, 2), (1, 3)}


def test_dpo_pairs_deterministic_and_seed_dependent():
    rows = make_rows({0: (5, 5), 1: (4, 6)})
    a, _ = dpo_pairs(rows, max_pairs=10, seed=1)
    shuffled = rows[::-1]
    assert dpo_pairs(shuffled, max_pairs=10, seed=1)[0] == a
    draws = {tuple((c["prompt_index"], c["sample_index"], r["sample_index"]) for c, r in dpo_pairs(rows, 10, seed=s)[0])
             for s in range(5)}
    # each seed draws 10 distinct pairs per prompt (of 25 and 24 combinations), and seeds differ
    assert all(len(set(d)) == 20 for d in draws)
    assert len(draws) > 1 and comb(25, 10) > 5


def test_dpo_pairs_all_negative_set_raises_with_explanation():
    with pytest.raises(ValueError, match="correct and an incorrect response") as err:
        dpo_pairs(make_rows({0: (0, 4), 1: (0, 4)}))
    assert "2 are all-negative" in str(err.value)
    with pytest.raises(ValueError, match="all-positive"):
        dpo_pairs(make_rows({0: (3, 0)}))
    with pytest.raises(ValueError, match="max_pairs"):
        dpo_pairs(make_rows({0: (1, 1)}), max_pairs=0)


def test_group_by_prompt_separates_splits():
    rows = make_rows({0: (1, 1)}, split="train") + make_rows({0: (1, 0)}, split="validation")
    groups = group_by_prompt(rows)
    assert set(groups) == {("train", 0), ("validation", 0)}
    assert [len(g) for g in groups.values()] == [2, 1]  # splits in name order, then prompts
