"""Step-level Monte Carlo tree search for DVO's value targets (docs/dvo.md).

The tree
--------
One tree per prompt. The root is the prompt; a child is one sampled reasoning step (token ids),
so node k on a path is the state S_k = prompt ++ step_0 ++ ... ++ step_{k-1}. Every node keeps a
visit count N and a reward sum W; Q = W / N (0 while N = 0).

One simulation (the budget unit, the source's ``iterations``)
-------------------------------------------------------------
1. **Selection.** From the root, repeatedly take the child with the highest PUCT score among the
   children that are neither terminal nor exhausted::

       score(c) = Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c)),     c_puct = 1.5
       P(c)     = exp((prior(c) - prior(parent)) / len(c))
       prior(c) = (1 / len(c)) * sum_{t in step c} log pi(a_t | s_t)         (temperature 1)

   ``len(c)`` is the step's token count and ``prior(root) = 0``. This is the source's
   ``MCTSNode.puct`` without a value model: the prior is the step's length-normalised log-prob
   (``q_pi / token_num``) and the difference to the parent's prior is divided by ``len(c)``
   *again*; P is not normalised over siblings. Exact ties are broken at random by the search's
   seeded generator. A node whose children are all terminal or exhausted is marked exhausted and
   selection backs up to try the parent's next-best child; a tree whose root is exhausted is
   finished early. Until some terminal reward has been backed up through a node (N = 0) the
   exploration term is 0, so the choice among its children is uniform at random (as in the source).
2. **Expansion.** The selected leaf gets ``width`` (5) next steps sampled at temperature 1.0, each
   cut right after its first step (:func:`lit_reason.rollout.next_step.sample_next_steps`). Samples with an identical step
   (same text and the same ending) are merged into one child; ``StepNode.samples`` keeps the
   multiplicity and :attr:`SearchStats.duplicates` the count, so merges never vanish silently.
   Empty steps are dropped (:attr:`SearchStats.invalid`).
3. **Evaluation and backup.** A child is terminal when its step ends the response (EOS, or the
   step states a final answer: ``task.extract_answer(step) is not None``), earning
   ``positive_reward`` (+1) if the task grades the whole response correct and
   ``negative_reward`` (-1) otherwise; when the token limit cut the step before it ended
   (-1, status ``"length"``); or when it is not final and lies deeper than ``max_depth`` (-1,
   status ``"depth"``; as in the source, step ``max_depth + 1`` may still be a final answer). Each
   terminal child's reward R is backed up once: the child and every ancestor up to the root get
   N += 1, W += R. Non-terminal children back up nothing (``update_on_step: False``), so a node's Q
   is the mean terminal reward found in its subtree and N(root) is the number of terminal rewards
   found. A leaf whose expansion yields no valid child becomes terminal itself with
   ``negative_reward`` (status ``"no_valid_child"``), backed up once.

   An expansion counts as ONE simulation however many terminal children it backs up (the
   source's ``iterations: 80`` counts select-expand rounds); ``SearchStats.backups`` counts the
   terminal rewards backed up.

Batching
--------
The search runs many trees in *waves*. A wave selects one leaf in every unfinished tree (or up to
``leaves_per_tree``, with a virtual loss on the paths already chosen in that wave, so the next
selection in the same tree prefers other branches), then expands every selected leaf with ONE
call of the proposer's ``sample_steps`` (the real one: one ``RolloutEngine.sample`` call with
k = width, each prefix encoded once) and ONE batched forward for the priors of the new children
(``step_logprobs``, chunked by ``batch_size``). A search therefore costs batched forward passes per
wave, never one sequence at a time.

Policies
--------
The search talks to a :class:`StepProposer` (``sample_steps``, ``step_logprobs``, ``reward``).
:class:`LMStepProposer` wraps a :class:`~lit_reason.rollout.sampler.RolloutEngine`, a
:class:`~lit_reason.steps.StepSplitter` and a task; tests plug a scripted policy into the same
three calls.

File format (:func:`save_trees` / :func:`load_trees`)
------------------------------------------------------
One JSON object, written to a temp file in the same folder and renamed (atomic)::

    format    "lit_reason.mcts_trees"
    version   1
    meta      any JSON object the caller passes (search settings, policy name ...)
    trees     list of trees:
      prompt_index   row of the prompt in its task split
      prompt_ids     prompt token ids
      simulations    simulations spent on the tree so far
      nodes          list, index 0 = root; a node's children are the later nodes naming it as
                     parent, in index order (the order they were created):
        parent       index of the parent (-1 for the root)
        ids          the step's token ids ([] for the root)
        text         the step's text (decoded in context, special tokens skipped)
        depth        0 for the root, parent's + 1
        prior        length-normalised log-prob of the step (0 for the root)
        logprobs     log pi(a_t | s_t) of each step token at temperature 1
        N, W         visit count and reward sum
        terminal     bool; status "open" | "end" | "length" | "depth" | "no_valid_child"
        reward       the terminal reward (null when not terminal)
        exhausted    no selectable leaf left below (terminal nodes are exhausted too)
        samples      how many of the expansion's samples produced this step (>= 1)

Floats are written with Python's shortest round-trip repr, so :func:`load_trees` rebuilds trees
equal (``==``) to the saved ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from lit_reason.io import atomic_write_json
from lit_reason.models.logprobs import pack_states, response_logprobs
from lit_reason.rollout.next_step import sample_next_steps
from lit_reason.rollout.sampler import RolloutEngine, eval_mode
from lit_reason.rollout.trajectories import encode_prompts
from lit_reason.steps import StepSplitter

__all__ = [
    "FORMAT", "FORMAT_VERSION", "LMStepProposer", "SearchStats", "SearchTree", "StepMCTS", "StepNode",
    "StepProposer", "StepSample", "load_trees", "puct_score", "run_mcts", "save_trees",
    "select_child", "step_logprobs",
]

FORMAT = "lit_reason.mcts_trees"
FORMAT_VERSION = 1
STATUSES = ("open", "end", "length", "depth", "no_valid_child")


# ---------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------
@dataclass
class StepNode:
    """One node: the state reached by appending ``ids`` to the parent's state (fields: module doc)."""

    parent: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    depth: int = 0
    prior: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    N: int = 0
    W: float = 0.0
    terminal: bool = False
    status: str = "open"
    reward: float | None = None
    exhausted: bool = False
    samples: int = 1
    children: list[int] = field(default_factory=list)

    @property
    def q(self) -> float:
        """Q = W / N, 0 while unvisited."""
        return self.W / self.N if self.N else 0.0


@dataclass
class SearchTree:
    """The search tree of one prompt.

    Attributes:
        prompt_index: Row of the prompt in its task split.
        prompt_ids: The prompt's token ids (the root state S_0).
        nodes: All nodes; ``nodes[0]`` is the root, a child always comes after its parent.
        simulations: Simulations spent on this tree (cumulative over ``search`` calls).
    """

    prompt_index: int
    prompt_ids: list[int]
    nodes: list[StepNode] = field(default_factory=lambda: [StepNode(parent=-1)])
    simulations: int = 0

    @property
    def root(self) -> StepNode:
        return self.nodes[0]

    @property
    def exhausted(self) -> bool:
        """No selectable leaf is left: further simulations cannot change the tree."""
        return self.root.exhausted or self.root.terminal

    def path(self, index: int) -> list[int]:
        """Node indices from the root to ``index`` (both included)."""
        out = [index]
        while self.nodes[out[-1]].parent >= 0:
            out.append(self.nodes[out[-1]].parent)
        return out[::-1]

    def response_ids(self, index: int) -> list[int]:
        """The partial response of node ``index``: its path's step ids concatenated."""
        return [t for i in self.path(index)[1:] for t in self.nodes[i].ids]

    def add_child(self, parent: int, node: StepNode) -> int:
        self.nodes.append(node)
        self.nodes[parent].children.append(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def backup(self, index: int, reward: float) -> None:
        """N += 1 and W += reward on ``index`` and every ancestor up to the root."""
        while index >= 0:
            node = self.nodes[index]
            node.N += 1
            node.W += reward
            index = node.parent


def puct_score(q: float, n: int, prior: float, parent_prior: float, length: int, parent_n: int,
               c_puct: float) -> float:
    """``Q + c_puct * exp((prior - parent_prior) / length) * sqrt(parent_n) / (1 + n)`` (module doc)."""
    p = math.exp((prior - parent_prior) / max(length, 1))
    return q + c_puct * p * math.sqrt(parent_n) / (1 + n)


def select_child(tree: SearchTree, index: int, c_puct: float, rng: random.Random,
                 virtual: dict[int, int] | None = None, virtual_loss: float = 1.0) -> list[int]:
    """Selectable children of node ``index``, best PUCT score first (exact ties in random order).

    Args:
        tree: The tree.
        index: The parent node.
        c_puct: Exploration constant.
        rng: Tie-break generator.
        virtual: Virtual visits per node index added in the current wave (each also adds
            ``-virtual_loss`` to W), so several leaves of one tree can be chosen per wave.
        virtual_loss: Reward charged per virtual visit.

    Returns:
        Child indices that are neither terminal nor exhausted, in selection order (``[0]`` is
        the PUCT choice); ``[]`` when there is none.
    """
    virtual = virtual or {}
    parent = tree.nodes[index]
    parent_n = parent.N + virtual.get(index, 0)
    scored = []
    for c in parent.children:
        child = tree.nodes[c]
        if child.terminal or child.exhausted:
            continue
        v = virtual.get(c, 0)
        n = child.N + v
        q = (child.W - v * virtual_loss) / n if n else 0.0
        score = puct_score(q, n, child.prior, parent.prior, len(child.ids), parent_n, c_puct)
        scored.append((-score, rng.random(), c))
    return [c for _, _, c in sorted(scored)]


# ---------------------------------------------------------------------------------------------
# the policy side
# ---------------------------------------------------------------------------------------------
@dataclass
class StepSample:
    """One sampled next step.

    Attributes:
        ids: The step's token ids (cut right after its first step; EOS included if generated).
        text: The step's text (special tokens skipped).
        ends_response: The step ends the response (EOS, or it states the final answer).
        truncated: The token limit cut the step before it ended (it is not a whole step).
        generated: Tokens the sampler produced for this sample (>= len(ids): a tail after the
            first step is discarded), for throughput counts.
    """

    ids: list[int]
    text: str
    ends_response: bool = False
    truncated: bool = False
    generated: int = 0


class StepProposer(Protocol):
    """What :class:`StepMCTS` needs from a policy."""

    def sample_steps(self, prompt_ids: Sequence[Sequence[int]], partial_ids: Sequence[Sequence[int]],
                     width: int) -> list[list[StepSample]]:
        """``width`` next steps of each state prompt ++ partial (N lists of ``width``), in one batch."""

    def step_logprobs(self, prompt_ids: Sequence[Sequence[int]], partial_ids: Sequence[Sequence[int]],
                      steps: Sequence[Sequence[int]]) -> list[list[float]]:
        """log pi(a_t | s_t) at temperature 1 of each step's tokens after its state, in one batch."""

    def reward(self, response_ids: Sequence[int], example: dict) -> float:
        """The task's 0/1 grade of a finished response."""


@torch.no_grad()
def step_logprobs(model, prefixes: Sequence[Sequence[int]], steps: Sequence[Sequence[int]], pad_token_id: int,
                  batch_size: int = 64) -> list[list[float]]:
    """log pi(step_t | prefix, step_<t) at temperature 1, batched.

    Each chunk of ``batch_size`` sequences is one forward of ``[B, P + L]`` (prefixes left-padded
    to P, steps right-padded to L) through
    :func:`~lit_reason.models.logprobs.response_logprobs`.

    Returns:
        One list per step, ``len(steps[i])`` floats.
    """
    out: list[list[float]] = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(steps), batch_size):
            pre, st = prefixes[start:start + batch_size], steps[start:start + batch_size]
            ids, mask, P, _ = pack_states(pre, st, pad_token_id, min_width=1)
            lp = response_logprobs(model, ids.to(device), mask.to(device), P).float().cpu()
            out.extend(lp[b, :len(s)].tolist() for b, s in enumerate(st))
    return out


class LMStepProposer:
    """The real policy behind :class:`StepMCTS`: a rollout engine, a step splitter and a task.

    Args:
        engine: Sampler of the policy (its model also gives the priors).
        splitter: Step definition; its delimiter is the stop string of one step.
        task: Grades responses (``reward``) and detects a stated final answer (``extract_answer``).
        temperature: Expansion temperature (1.0 in DVO).
        max_new_tokens: Token limit of one step (the engine's by default).
        answer_ends_response: A step stating a final answer is terminal even without EOS (DVO).
        batch_size: Sequences per prior forward (the engine's ``batch_size`` by default).

    Attributes:
        sample_calls: ``engine.sample`` calls made (one per wave).
        forward_calls: Prior forwards made (one per wave and ``batch_size`` chunk).
    """

    def __init__(self, engine: RolloutEngine, splitter: StepSplitter, task, temperature: float = 1.0,
                 max_new_tokens: int | None = None, answer_ends_response: bool = True,
                 batch_size: int | None = None) -> None:
        self.engine, self.splitter, self.task = engine, splitter, task
        self.tokenizer = engine.tokenizer
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.answer_ends_response = answer_ends_response
        self.batch_size = batch_size or engine.batch_size
        self.sample_calls = 0
        self.forward_calls = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def sample_steps(self, prompt_ids, partial_ids, width):
        self.sample_calls += 1
        prefixes = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
        cuts = sample_next_steps(self.engine, self.splitter, prefixes, width, temperature=self.temperature,
                                 max_new_tokens=self.max_new_tokens, desc="mcts expansion")
        out = []
        eos = self.tokenizer.eos_token_id
        for i, partial in enumerate(partial_ids):
            before = self._decode(partial)
            group = []
            for step in cuts[i * width:(i + 1) * width]:
                ids, generated = step.ids, step.generated
                full = self._decode(list(partial) + ids)
                # the step's text in context, so concatenated step texts give the response text
                text = full[len(before):] if full.startswith(before) else self._decode(ids)
                truncated = step.capped
                answered = self.answer_ends_response and self.task.extract_answer(text) is not None
                ends = not truncated and ((step.terminal and ids[-1:] == [eos]) or answered)
                group.append(StepSample(ids, text, ends_response=ends, truncated=truncated, generated=generated))
            out.append(group)
        return out

    def step_logprobs(self, prompt_ids, partial_ids, steps):
        prefixes = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
        self.forward_calls += math.ceil(len(steps) / self.batch_size)
        return step_logprobs(self.engine.model, prefixes, steps, self.tokenizer.pad_token_id, self.batch_size)

    def reward(self, response_ids, example):
        return float(self.task.reward(self._decode(response_ids), example))


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
@dataclass
class SearchStats:
    """Running counters of a :class:`StepMCTS` (summed over its ``search`` calls).

    Attributes:
        simulations: Select-expand rounds (the budget unit; one per expanded leaf).
        expansions: Leaves expanded (equal to ``simulations``: every simulation expands one leaf).
        waves: Batched rounds (one ``sample_steps`` call and one prior batch each).
        nodes: Children created.
        backups: Terminal rewards backed up to the root.
        duplicates: Samples merged into an identical sibling step.
        invalid: Empty samples dropped.
        generated_tokens: Tokens the sampler generated (discarded tails included).
        wall_time: Seconds spent in ``search``.
    """

    simulations: int = 0
    expansions: int = 0
    waves: int = 0
    nodes: int = 0
    backups: int = 0
    duplicates: int = 0
    invalid: int = 0
    generated_tokens: int = 0
    wall_time: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters plus ``tokens_per_s`` and ``simulations_per_s``."""
        out = asdict(self)
        wall = max(self.wall_time, 1e-9)
        out["tokens_per_s"] = self.generated_tokens / wall
        out["simulations_per_s"] = self.simulations / wall
        return out


class StepMCTS:
    """Batched step-level MCTS over many prompts (algorithm: module doc).

    Args:
        proposer: The policy (:class:`LMStepProposer`, or any :class:`StepProposer`).
        simulations: Budget per prompt (select-expand rounds; 80 in DVO).
        width: Next steps sampled per expansion (5 in DVO).
        c_puct: Exploration constant (1.5).
        max_depth: Deepest non-final step (8); a non-final step deeper than this is terminal.
        positive_reward: Terminal reward of a correct response (> 0).
        negative_reward: Terminal reward of a wrong, truncated, too deep or dead-end one (<= 0;
            {0, 1} rewards are allowed, +-1 is DVO's).
        leaves_per_tree: Leaves selected per tree per wave (virtual loss between them).
        virtual_loss: Reward charged per virtual visit while a wave is pending.
        seed: Seed of the tie-break generator.

    Raises:
        ValueError: A bad setting (the message names the argument).
    """

    def __init__(self, proposer: StepProposer, simulations: int = 80, width: int = 5, c_puct: float = 1.5,
                 max_depth: int = 8, positive_reward: float = 1.0, negative_reward: float = -1.0,
                 leaves_per_tree: int = 1, virtual_loss: float = 1.0, seed: int = 0) -> None:
        for name, value, low in (("simulations", simulations, 1), ("width", width, 1), ("max_depth", max_depth, 1),
                                 ("leaves_per_tree", leaves_per_tree, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not c_puct >= 0:
            raise ValueError(f"c_puct must be >= 0, got {c_puct!r}")
        if not virtual_loss >= 0:
            raise ValueError(f"virtual_loss must be >= 0, got {virtual_loss!r}")
        if not positive_reward > 0 >= negative_reward:
            # path extraction tells correct from incorrect leaves by the sign of the reward
            raise ValueError(f"positive_reward must be > 0 and negative_reward <= 0, got {positive_reward!r}, "
                             f"{negative_reward!r}")
        self.proposer = proposer
        self.simulations, self.width, self.c_puct, self.max_depth = simulations, width, c_puct, max_depth
        self.positive_reward, self.negative_reward = float(positive_reward), float(negative_reward)
        self.leaves_per_tree, self.virtual_loss = leaves_per_tree, virtual_loss
        self.rng = random.Random(seed)
        self.stats = SearchStats()

    # ----------------------------------------------------------------------------- selection
    def select_leaf(self, tree: SearchTree, pending: set[int] | None = None,
                    virtual: dict[int, int] | None = None) -> int | None:
        """The open leaf the next simulation expands, or None when none is selectable.

        Walks down by PUCT; a subtree with nothing selectable (all terminal, exhausted, or leaves
        already ``pending`` in this wave) is skipped for the parent's next-best child, and a node
        whose children are all terminal or exhausted is marked exhausted.
        """
        pending = pending or set()
        root = tree.root
        if root.terminal or root.exhausted:
            return None
        if not root.children:
            return None if 0 in pending else 0
        stack = [(0, iter(select_child(tree, 0, self.c_puct, self.rng, virtual, self.virtual_loss)))]
        while stack:
            index, options = stack[-1]
            nxt = next(options, None)
            if nxt is None:
                stack.pop()
                node = tree.nodes[index]
                if all(tree.nodes[c].terminal or tree.nodes[c].exhausted for c in node.children):
                    node.exhausted = True
                continue
            child = tree.nodes[nxt]
            if not child.children:
                if nxt not in pending:
                    return nxt
                continue
            stack.append((nxt, iter(select_child(tree, nxt, self.c_puct, self.rng, virtual, self.virtual_loss))))
        return None

    # ----------------------------------------------------------------------------- search
    def new_trees(self, prompt_ids: Sequence[Sequence[int]],
                  prompt_indices: Sequence[int] | None = None) -> list[SearchTree]:
        """Fresh trees (root only); ``prompt_indices`` default to 0..N-1."""
        indices = range(len(prompt_ids)) if prompt_indices is None else prompt_indices
        return [SearchTree(prompt_index=int(i), prompt_ids=list(p)) for i, p in zip(indices, prompt_ids)]

    def search(self, trees: Sequence[SearchTree], examples: Sequence[dict],
               simulations: int | None = None) -> list[SearchTree]:
        """Runs waves until every tree has spent ``simulations`` (cumulative) or is exhausted.

        Args:
            trees: Trees to grow in place (new or loaded ones: search resumes).
            examples: The task row of each tree (for the reward).
            simulations: Budget per tree (the constructor's by default).

        Returns:
            ``trees``.
        """
        budget = self.simulations if simulations is None else simulations
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"simulations must be an int >= 1, got {budget!r}")
        if len(trees) != len(examples):
            raise ValueError(f"got {len(trees)} trees but {len(examples)} examples")
        start = time.perf_counter()
        try:
            while self.wave(trees, examples, budget):
                pass
        finally:
            self.stats.wall_time += time.perf_counter() - start
        return list(trees)

    def wave(self, trees: Sequence[SearchTree], examples: Sequence[dict], budget: int) -> bool:
        """One batched wave (module doc). Returns False when no tree had a leaf to expand."""
        requests: list[tuple[int, int]] = []
        for t, tree in enumerate(trees):
            pending: set[int] = set()
            virtual: dict[int, int] = {}
            for _ in range(min(self.leaves_per_tree, budget - tree.simulations)):
                leaf = self.select_leaf(tree, pending, virtual)
                if leaf is None:
                    break
                pending.add(leaf)
                for i in tree.path(leaf):
                    virtual[i] = virtual.get(i, 0) + 1
                requests.append((t, leaf))
        if not requests:
            return False
        prompts = [trees[t].prompt_ids for t, _ in requests]
        partials = [trees[t].response_ids(leaf) for t, leaf in requests]
        samples = self.proposer.sample_steps(prompts, partials, self.width)
        self.stats.waves += 1
        # merge identical steps per leaf; score only the distinct ones
        kept: list[tuple[int, StepSample, int]] = []  # (request, sample, multiplicity)
        for r, group in enumerate(samples):
            seen: dict[tuple, int] = {}
            for s in group:
                self.stats.generated_tokens += s.generated
                if not s.ids or (not s.ends_response and s.text == ""):
                    self.stats.invalid += 1
                    continue
                key = (s.text, s.ends_response, s.truncated)
                if key in seen:
                    self.stats.duplicates += 1
                    j = seen[key]
                    kept[j] = (r, kept[j][1], kept[j][2] + 1)
                    continue
                seen[key] = len(kept)
                kept.append((r, s, 1))
        logprobs = self.proposer.step_logprobs([prompts[r] for r, _, _ in kept], [partials[r] for r, _, _ in kept],
                                               [s.ids for _, s, _ in kept]) if kept else []
        children: dict[int, list[tuple[StepSample, int, list[float]]]] = {r: [] for r in range(len(requests))}
        for (r, s, mult), lp in zip(kept, logprobs):
            children[r].append((s, mult, [float(x) for x in lp]))
        for r, (t, leaf) in enumerate(requests):
            self._expand(trees[t], leaf, partials[r], children[r], examples[t])
        return True

    def _expand(self, tree: SearchTree, leaf: int, partial: list[int], kids, example: dict) -> None:
        tree.simulations += 1
        self.stats.simulations += 1
        self.stats.expansions += 1
        node = tree.nodes[leaf]
        if not kids:
            node.terminal, node.exhausted, node.status = True, True, "no_valid_child"
            node.reward = self.negative_reward
            tree.backup(leaf, node.reward)
            self.stats.backups += 1
            return
        for s, mult, lp in kids:
            child = StepNode(parent=leaf, ids=list(s.ids), text=s.text, depth=node.depth + 1,
                             prior=sum(lp) / len(lp), logprobs=lp, samples=mult)
            if s.truncated:
                child.status, child.reward = "length", self.negative_reward
            elif s.ends_response:
                correct = self.proposer.reward(partial + child.ids, example) > 0.5
                child.status = "end"
                child.reward = self.positive_reward if correct else self.negative_reward
            elif child.depth > self.max_depth:
                child.status, child.reward = "depth", self.negative_reward
            index = tree.add_child(leaf, child)
            self.stats.nodes += 1
            if child.reward is not None:
                child.terminal = child.exhausted = True
                tree.backup(index, child.reward)
                self.stats.backups += 1
        if all(tree.nodes[c].terminal for c in node.children):
            node.exhausted = True


def run_mcts(engine: RolloutEngine, task, splitter: StepSplitter, examples: Sequence[dict],
             prompt_indices: Sequence[int] | None = None, **search_kwargs) -> tuple[list[SearchTree], SearchStats]:
    """Convenience: prompts ``task.prompt(example)``, a :class:`LMStepProposer` and one search.

    Args:
        engine: Sampler of the policy.
        task: The task.
        splitter: Step definition.
        examples: Task rows (one tree each).
        prompt_indices: Their rows in the split (0..N-1 by default).
        **search_kwargs: :class:`StepMCTS` settings.

    Returns:
        ``(trees, stats)``.
    """
    mcts = StepMCTS(LMStepProposer(engine, splitter, task), **search_kwargs)
    prompt_ids = encode_prompts(engine.tokenizer, [task.prompt(e) for e in examples])
    trees = mcts.search(mcts.new_trees(prompt_ids, prompt_indices), examples)
    return trees, mcts.stats


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
_NODE_KEYS = ("parent", "ids", "text", "depth", "prior", "logprobs", "N", "W", "terminal", "status", "reward",
              "exhausted", "samples")


def save_trees(path: str | os.PathLike, trees: Sequence[SearchTree], meta: dict | None = None) -> Path:
    """Writes trees as one JSON file (format: module doc), atomically."""
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "meta": meta or {},
        "trees": [
            {"prompt_index": t.prompt_index, "prompt_ids": t.prompt_ids, "simulations": t.simulations,
             "nodes": [{k: getattr(n, k) for k in _NODE_KEYS} for n in t.nodes]}
            for t in trees
        ],
    }
    return atomic_write_json(path, payload, ensure_ascii=False, allow_nan=False)


def load_trees(path: str | os.PathLike, return_meta: bool = False):
    """Reads a file of :func:`save_trees`.

    Returns:
        The trees (equal to the saved ones), or ``(trees, meta)`` with ``return_meta``.

    Raises:
        ValueError: Not an MCTS tree file, another format version, or an inconsistent tree.
    """
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lit_reason MCTS tree file (no format {FORMAT!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has version {payload.get('version')!r}; this lit_reason reads {FORMAT_VERSION}")
    trees = []
    for t, raw in enumerate(payload["trees"]):
        nodes = [StepNode(**{k: n[k] for k in _NODE_KEYS}) for n in raw["nodes"]]
        for i, n in enumerate(nodes):
            if (i == 0) != (n.parent < 0) or n.parent >= i or n.status not in STATUSES:
                raise ValueError(f"{path}: tree {t} node {i} has parent {n.parent} / status {n.status!r}")
            if i:
                nodes[n.parent].children.append(i)
        trees.append(SearchTree(int(raw["prompt_index"]), list(raw["prompt_ids"]), nodes, int(raw["simulations"])))
    return (trees, payload.get("meta", {})) if return_meta else trees
