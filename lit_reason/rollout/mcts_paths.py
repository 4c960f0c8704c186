"""DVO training rows from MCTS trees (docs/dvo.md, "Targets"; the extraction of
the DVO authors' released code, arXiv 2502.13723).

1. List every root-to-leaf path that ends in a terminal leaf of an allowed status (by default
   ``"end"``: the response ended with EOS or a final answer; truncated, too-deep and dead-end
   leaves are the "invalid leaves" the source prunes, though their -1 stays in every Q above them),
   with Q = W / N and N of each node on it.
2. Per prompt, sample up to ``max_correct`` correct and up to ``max_incorrect`` incorrect paths
   without replacement, with probability proportional to the path's total visit count (the sum of
   N over its nodes, root included), from a generator seeded by ``(seed, prompt_index)``, so the
   choice for one prompt does not depend on the others.
3. Drop prompts that have no correct path (counted in :class:`ExtractionStats`).
4. Per-step targets ``Q(node_{k+1}) - Q(node_k)`` for steps k = 0..T-1 (the source's 1-based
   ``Q(node_k) - Q(node_{k-1})``), node 0 = the root and the last node's Q = its terminal reward
   R (+-1), computed by :func:`lit_reason.losses.dvo.targets_from_q`; they telescope to
   ``R - Q(root)``.

Rows have the fields of a trajectory-dataset row (:mod:`lit_reason.data.trajectories`):
``prompt_index``, ``split``, ``sample_index`` (rank of the path among the prompt's chosen ones),
``prompt_ids``, ``response_ids`` (the path's step ids concatenated), ``step_ends`` (last token of
each tree step), ``reward`` (the grader's 0/1 outcome, as in that format), ``finish`` (``"eos"``
when the last step ends with EOS, else ``"stop"``), ``behaviour_logprobs`` (log pi at temperature 1
of each token, from the search's prior forward) and ``response``; plus

    step_targets   T floats on the MCTS reward scale (+-1): the DVO targets of the T steps
    q_path         T + 1 floats: Q(root), Q(node_1) .. Q(node_{T-1}), R
    visits         T + 1 ints: N of the same nodes
    mcts_reward    R (+-1)

so ``TrajectoryDataset.to_batch(rows, pad)`` batches them (its steps are the tree's steps, as
``step_ends`` defines them) and :func:`step_targets_tensor` gives the matching ``[B, S]`` targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from lit_reason.losses.dvo import targets_from_q
from lit_reason.rollout.mcts import SearchTree

__all__ = ["ExtractionStats", "LeafPath", "extract_rows", "leaf_paths", "path_targets", "sample_paths",
           "step_targets_tensor"]


@dataclass
class LeafPath:
    """One root-to-terminal-leaf path of a tree.

    Attributes:
        prompt_index: The tree's prompt.
        nodes: Node indices, root first, terminal leaf last (T + 1 of them for T steps).
        q: Q = W / N of each node; the last entry is the leaf's terminal reward R.
        n: N of each node.
        reward: R, the leaf's terminal reward.
        correct: R > 0 (the grader said correct).
    """

    prompt_index: int
    nodes: list[int]
    q: list[float]
    n: list[int]
    reward: float
    correct: bool

    @property
    def visits(self) -> int:
        """Total visit count of the path (its sampling weight)."""
        return sum(self.n)

    @property
    def num_steps(self) -> int:
        return len(self.nodes) - 1


@dataclass
class ExtractionStats:
    """What :func:`extract_rows` kept and dropped.

    Attributes:
        prompts: Trees seen.
        kept_prompts: Trees that gave rows.
        dropped_only_incorrect: Trees whose valid paths were all incorrect (dropped).
        dropped_no_paths: Trees with no valid terminal path at all (dropped).
        paths: Valid terminal paths listed over all trees.
        rows: Rows returned.
        correct_rows: Of which correct.
    """

    prompts: int = 0
    kept_prompts: int = 0
    dropped_only_incorrect: int = 0
    dropped_no_paths: int = 0
    paths: int = 0
    rows: int = 0
    correct_rows: int = 0


def leaf_paths(tree: SearchTree, statuses: Sequence[str] = ("end",)) -> list[LeafPath]:
    """Every root-to-leaf path ending in a terminal leaf whose status is in ``statuses``, in node order."""
    out = []
    for i, node in enumerate(tree.nodes):
        if i == 0 or not node.terminal or node.status not in statuses:
            continue
        nodes = tree.path(i)
        q = [tree.nodes[j].q for j in nodes[:-1]] + [float(node.reward)]
        n = [tree.nodes[j].N for j in nodes]
        out.append(LeafPath(tree.prompt_index, nodes, q, n, float(node.reward), node.reward > 0))
    return out


def sample_paths(paths: Sequence[LeafPath], k: int, rng: random.Random) -> list[LeafPath]:
    """Up to ``k`` paths without replacement, each draw with probability proportional to ``visits``."""
    pool = list(paths)
    out = []
    while pool and len(out) < k:
        weights = [p.visits for p in pool]
        total = sum(weights)
        # every listed path has N >= 1 on each node, so weights are positive
        x, acc, pick = rng.random() * total, 0.0, len(pool) - 1
        for j, w in enumerate(weights):
            acc += w
            if x < acc:
                pick = j
                break
        out.append(pool.pop(pick))
    return out


def path_targets(paths: Sequence[LeafPath]) -> list[list[float]]:
    """DVO step targets of each path via :func:`~lit_reason.losses.dvo.targets_from_q` (T floats each)."""
    if not paths:
        return []
    S = max(p.num_steps for p in paths)
    q = torch.zeros(len(paths), S + 1, dtype=torch.float64)
    for b, p in enumerate(paths):
        q[b, : len(p.q)] = torch.tensor(p.q, dtype=torch.float64)
    num = torch.tensor([p.num_steps for p in paths], dtype=torch.long)
    t = targets_from_q(q, num)
    return [t[b, : p.num_steps].tolist() for b, p in enumerate(paths)]


def _row(tree: SearchTree, path: LeafPath, sample_index: int, split: str, targets: list[float],
         eos_token_id: int | None) -> dict:
    steps = [tree.nodes[j] for j in path.nodes[1:]]
    response_ids = [t for s in steps for t in s.ids]
    ends, total = [], 0
    for s in steps:
        total += len(s.ids)
        ends.append(total - 1)
    last = steps[-1].ids
    eos = eos_token_id is not None and last and last[-1] == eos_token_id
    return {
        "prompt_index": tree.prompt_index,
        "split": split,
        "sample_index": sample_index,
        "prompt_ids": list(tree.prompt_ids),
        "response_ids": response_ids,
        "step_ends": ends,
        "reward": 1.0 if path.correct else 0.0,
        "finish": "eos" if eos else "stop",
        "behaviour_logprobs": [x for s in steps for x in s.logprobs],
        "response": "".join(s.text for s in steps),
        "step_targets": targets,
        "q_path": list(path.q),
        "visits": list(path.n),
        "mcts_reward": path.reward,
    }


def extract_rows(trees: Sequence[SearchTree], max_correct: int = 8, max_incorrect: int = 8, seed: int = 0,
                 split: str = "train", statuses: Sequence[str] = ("end",),
                 eos_token_id: int | None = None) -> tuple[list[dict], ExtractionStats]:
    """DVO rows from searched trees (steps 1-4 of the module doc).

    Args:
        trees: Searched trees.
        max_correct: Correct paths kept per prompt at most (8 in DVO).
        max_incorrect: Incorrect paths kept per prompt at most (8 in DVO).
        seed: Seed of the path sampling (combined with each tree's ``prompt_index``).
        split: The task split of the prompts (written into each row).
        statuses: Terminal statuses whose leaves are valid paths.
        eos_token_id: The EOS id, to tell ``finish`` "eos" from "stop" (None: always "stop").

    Returns:
        ``(rows, stats)``; rows ordered by tree, then correct paths before incorrect ones.

    Raises:
        ValueError: A negative ``max_correct`` / ``max_incorrect``.
    """
    for name, value in (("max_correct", max_correct), ("max_incorrect", max_incorrect)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    stats = ExtractionStats(prompts=len(trees))
    rows: list[dict] = []
    for tree in trees:
        paths = leaf_paths(tree, statuses)
        stats.paths += len(paths)
        if not paths:
            stats.dropped_no_paths += 1
            continue
        correct = [p for p in paths if p.correct]
        if not correct:
            stats.dropped_only_incorrect += 1
            continue
        rng = random.Random(seed * 1_000_003 + tree.prompt_index)
        chosen = sample_paths(correct, max_correct, rng)
        chosen += sample_paths([p for p in paths if not p.correct], max_incorrect, rng)
        if not chosen:
            continue
        stats.kept_prompts += 1
        for j, (path, targets) in enumerate(zip(chosen, path_targets(chosen))):
            rows.append(_row(tree, path, j, split, targets, eos_token_id))
            stats.correct_rows += int(path.correct)
    stats.rows = len(rows)
    return rows, stats


def step_targets_tensor(rows: Sequence[dict], max_steps: int | None = None) -> torch.Tensor:
    """``[B, S]`` float targets of rows (0 past each row's steps), aligned with ``to_batch(rows)``.

    Args:
        rows: Rows with ``step_targets``.
        max_steps: S (the longest row by default; ``to_batch`` uses the same).
    """
    S = max_steps if max_steps is not None else max(len(r["step_targets"]) for r in rows)
    out = torch.zeros(len(rows), S)
    for b, r in enumerate(rows):
        t = r["step_targets"][:S]
        out[b, : len(t)] = torch.tensor(t, dtype=torch.float32)
    return out
