"""Step-level MCTS (``lit_reason.rollout.mcts``) and DVO path extraction (``mcts_paths``).

Most tests drive the search with scripted policies over a tiny step vocabulary, whose step values
are known exactly; one runs the real tiny Llama end to end through ``RolloutEngine``.

A note on what MCTS's Q(root) estimates: in general it is NOT the policy's success probability.
PUCT sends more visits to better children, identical steps are merged (each distinct terminal leaf
is backed up once however often it was sampled), and leaves are counted where the search found
them. The convergence test therefore uses a *memoryless* policy (every state has the same
next-step distribution and every sampled step is unique), for which each expansion's terminal
children are i.i.d. whatever leaf selection picked: then Q(root) is the mean of i.i.d. +-1
rewards and converges to 2 * P(correct) - 1.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from lit_reason.data.trajectories import ROW_FIELDS, TrajectoryDataset
from lit_reason.losses.dvo import targets_from_q
from lit_reason.models.logprobs import response_logprobs
from lit_reason.rollout.mcts import (
    LMStepProposer,
    SearchTree,
    StepMCTS,
    StepNode,
    StepSample,
    load_trees,
    puct_score,
    run_mcts,
    save_trees,
    select_child,
)
from lit_reason.rollout.mcts_paths import extract_rows, leaf_paths, sample_paths, step_targets_tensor
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import encode_prompts
from lit_reason.steps import StepSplitter
from lit_reason.tasks.arithmetic import ArithmeticTask

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FILL, RIGHT, WRONG = 1, 2, 3  # token id of each step kind (a step is [kind, nonce])
NAMES = {FILL: "x", RIGHT: "R", WRONG: "W"}


class ScriptedPolicy:
    """A policy over three step kinds: filler (goes on), R (final, correct), W (final, wrong).

    Args:
        probs: P(filler), P(R), P(W) of every step, in every state (memoryless).
        unique: Append a random nonce so no two sampled steps are identical (no merging).
        seed: Seed of the sampling.
        script: Instead of sampling, return these kinds in this order for every expansion.
    """

    def __init__(self, probs=(0.6, 0.25, 0.15), unique=True, seed=0, script=None):
        self.probs, self.unique, self.script = probs, unique, script
        self.rng = random.Random(seed)
        self.calls = 0

    def sample_steps(self, prompt_ids, partial_ids, width):
        self.calls += 1
        out = []
        for _ in prompt_ids:
            kinds = self.script or self.rng.choices((FILL, RIGHT, WRONG), weights=self.probs, k=width)
            group = []
            for kind in kinds[:width]:
                nonce = self.rng.randrange(10**9) if self.unique else 0
                group.append(StepSample([kind, 100 + nonce], f"{NAMES[kind]}{nonce} ",
                                        ends_response=kind != FILL, generated=2))
            out.append(group)
        return out

    def step_logprobs(self, prompt_ids, partial_ids, steps):
        return [[math.log(self.probs[s[0] - 1]), -1.0] for s in steps]

    def reward(self, response_ids, example):
        return 1.0 if response_ids[-2] == RIGHT else 0.0


def search(policy, n_trees=1, **kwargs):
    mcts = StepMCTS(policy, **kwargs)
    trees = mcts.new_trees([[7, 8]] * n_trees)
    mcts.search(trees, [{}] * n_trees)
    return mcts, trees


# ------------------------------------------------------------------------------ (a) convergence
def test_root_q_converges_to_success_probability():
    probs = (0.6, 0.25, 0.15)
    truth = 2 * probs[1] / (probs[1] + probs[2]) - 1  # P(correct) = 0.625 -> 0.25 on the +-1 scale
    errors = {}
    for budget in (20, 200, 2000):
        # depth never binds here, so every expansion is an i.i.d. draw of the same distribution
        mcts, trees = search(ScriptedPolicy(probs, seed=budget), n_trees=4, simulations=budget, max_depth=10**6)
        assert all(t.simulations == budget for t in trees)  # no tree died out
        assert all(t.root.N == sum(n.terminal for n in t.nodes) for t in trees)  # each terminal backed up once
        errors[budget] = max(abs(t.root.q - truth) for t in trees)
    # ~2 terminals per expansion: std of Q(root) ~ 0.97 / sqrt(2 * budget) = 0.15, 0.05, 0.015
    assert errors[2000] < 0.05
    assert errors[2000] < errors[200] < errors[20]


# ------------------------------------------------------------------------------ (b) telescoping
def test_targets_telescope_and_rows_batch():
    mcts, trees = search(ScriptedPolicy((0.7, 0.15, 0.15), seed=3), n_trees=3, simulations=60, max_depth=4)
    rows, stats = extract_rows(trees, max_correct=4, max_incorrect=3, eos_token_id=None)
    assert stats.rows == len(rows) > 0 and stats.kept_prompts == 3
    by_prompt = {t.prompt_index: t for t in trees}
    for row in rows:
        tree = by_prompt[row["prompt_index"]]
        T = len(row["step_ends"])
        assert len(row["step_targets"]) == T == len(row["q_path"]) - 1
        assert row["q_path"][0] == tree.root.q and row["q_path"][-1] == row["mcts_reward"]
        assert sum(row["step_targets"]) == pytest.approx(row["mcts_reward"] - tree.root.q, abs=1e-12)
        # the same as the loss module's own target function
        expect = targets_from_q(torch.tensor([row["q_path"]], dtype=torch.float64), torch.tensor([T]))[0]
        assert row["step_targets"] == pytest.approx(expect.tolist(), abs=1e-12)
        assert set(ROW_FIELDS) <= set(row) and len(row["behaviour_logprobs"]) == len(row["response_ids"])
    for t in trees:
        rows_t = [r for r in rows if r["prompt_index"] == t.prompt_index]
        assert sum(r["reward"] == 1.0 for r in rows_t) <= 4 and sum(r["reward"] == 0.0 for r in rows_t) <= 3
    batch = TrajectoryDataset.to_batch(rows, pad_token_id=0)
    targets = step_targets_tensor(rows)
    assert targets.shape == batch.step_ends.shape
    for b, row in enumerate(rows):
        assert batch.num_steps[b] == len(row["step_targets"])
        assert batch.step_ends[b, : len(row["step_ends"])].tolist() == row["step_ends"]


def test_prompts_with_only_incorrect_paths_are_dropped_and_counted():
    _, good = search(ScriptedPolicy((0.5, 0.5, 0.0), seed=1), simulations=5)
    _, bad = search(ScriptedPolicy((0.5, 0.0, 0.5), seed=1), simulations=5)
    bad[0].prompt_index = 1
    rows, stats = extract_rows(good + bad)
    assert stats.dropped_only_incorrect == 1 and stats.kept_prompts == 1
    assert {r["prompt_index"] for r in rows} == {0}


def test_path_sampling_is_proportional_to_visits():
    # a root (N = 4) with two correct leaves (N = 1, 3): path visits 4 + 1 = 5 and 4 + 3 = 7,
    # so one draw picks them with probability 5/12 and 7/12
    tree = SearchTree(0, [1], [StepNode(parent=-1, N=4, W=4.0)])
    for n in (1, 3):
        tree.add_child(0, StepNode(parent=0, ids=[RIGHT, n], text="R", depth=1, logprobs=[0.0, 0.0],
                                   N=n, W=float(n), terminal=True, status="end", reward=1.0, exhausted=True))
    paths = leaf_paths(tree)
    assert [p.visits for p in paths] == [5, 7]
    rng = random.Random(0)
    heavy = sum(sample_paths(paths, 1, rng)[0].visits == 7 for _ in range(4000)) / 4000
    assert heavy == pytest.approx(7 / 12, abs=0.03)
    assert sorted(p.visits for p in sample_paths(paths, 5, rng)) == [5, 7]  # without replacement


# ------------------------------------------------------------------------------ (c) PUCT
def test_puct_picks_the_hand_computed_child():
    # root: N = 10, prior 0; sqrt(10) = 3.16228, c_puct = 1.5
    # A: N=4, W=2  (Q=0.5),  prior -1.0, 2 tokens: P = exp(-1/2) = 0.60653
    #    score = 0.5 + 1.5 * 0.60653 * 3.16228 / 5 = 0.5 + 0.57541 = 1.07541
    # B: N=1, W=-1 (Q=-1),  prior -0.2, 1 token:  P = exp(-0.2) = 0.81873
    #    score = -1 + 1.5 * 0.81873 * 3.16228 / 2 = -1 + 1.94179 = 0.94179
    # C: N=0 (Q=0),          prior -2.0, 4 tokens: P = exp(-2/4) = 0.60653
    #    score = 0 + 1.5 * 0.60653 * 3.16228 / 1 = 2.87703          <- the choice
    # D: terminal (Q=1, would score highest) and E: exhausted are never selectable.
    tree = SearchTree(0, [1], [StepNode(parent=-1, N=10, W=0.0)])
    A = tree.add_child(0, StepNode(parent=0, ids=[1, 1], prior=-1.0, N=4, W=2.0, children=[99]))
    B = tree.add_child(0, StepNode(parent=0, ids=[1], prior=-0.2, N=1, W=-1.0, children=[99]))
    C = tree.add_child(0, StepNode(parent=0, ids=[1, 1, 1, 1], prior=-2.0))
    tree.add_child(0, StepNode(parent=0, ids=[2], prior=0.0, N=5, W=5.0, terminal=True, reward=1.0))
    tree.add_child(0, StepNode(parent=0, ids=[1], prior=0.0, N=1, W=1.0, exhausted=True))
    assert select_child(tree, 0, 1.5, random.Random(0)) == [C, A, B]
    assert puct_score(0.5, 4, -1.0, 0.0, 2, 10, 1.5) == pytest.approx(1.07541, abs=1e-5)
    assert puct_score(-1.0, 1, -0.2, 0.0, 1, 10, 1.5) == pytest.approx(0.94179, abs=1e-5)
    assert puct_score(0.0, 0, -2.0, 0.0, 4, 10, 1.5) == pytest.approx(2.87703, abs=1e-5)
    # a non-root parent's prior enters: exp((-0.5 - -1.0) / 2) = exp(0.25) = 1.28403;
    # 0.5 + 1.5 * 1.28403 * sqrt(4) / (1 + 1) = 2.42604
    assert puct_score(0.5, 1, -0.5, -1.0, 2, 4, 1.5) == pytest.approx(2.42604, abs=1e-5)
    # with c_puct = 0 only Q counts: A (0.5) > C (0) > B (-1)
    assert select_child(tree, 0, 0.0, random.Random(0)) == [A, C, B]


def test_ties_are_broken_at_random_but_reproducibly():
    tree = SearchTree(0, [1], [StepNode(parent=-1)])
    kids = [tree.add_child(0, StepNode(parent=0, ids=[1])) for _ in range(3)]
    rng = random.Random(5)
    picks = [select_child(tree, 0, 1.5, rng)[0] for _ in range(60)]
    assert set(picks) == set(kids)
    rng2 = random.Random(5)
    assert picks == [select_child(tree, 0, 1.5, rng2)[0] for _ in range(60)]


# ------------------------------------------------------------------------------ (d) duplicates
def test_duplicates_are_merged_counted_and_the_exhausted_tree_is_exact():
    # every expansion samples x, R, x, W, R: children x (2 samples), R (2), W (1); 2 duplicates
    policy = ScriptedPolicy(unique=False, script=[FILL, RIGHT, FILL, WRONG, RIGHT])
    mcts, (tree,) = search(policy, simulations=50, max_depth=2)
    # root -> x1 -> x2 -> x3: x1, x2 at depth <= 2 are expanded; x3 (depth 3 > 2) is a "depth"
    # leaf (-1). Terminals: R, W under the root, x1 and x2 (+1 -1 three times) and x3 (-1):
    # N(root) = 7, W(root) = -1, and the tree is exhausted after 3 simulations.
    assert tree.simulations == 3 and tree.exhausted
    assert mcts.stats.duplicates == 6 and mcts.stats.nodes == 9 and mcts.stats.simulations == 3
    assert (tree.root.N, tree.root.W) == (7, -1.0)
    assert [tree.nodes[c].samples for c in tree.root.children] == [2, 2, 1]
    assert sum(n.samples for n in tree.nodes[1:]) == 5 * 3
    assert policy.calls == mcts.stats.waves == 3


# ------------------------------------------------------------------------------ (e) depth limit
def test_depth_limit_gives_negative_reward_but_an_answer_at_the_limit_counts():
    mcts, (tree,) = search(ScriptedPolicy(unique=False, script=[FILL]), simulations=20, max_depth=3)
    leaf = [n for n in tree.nodes if n.terminal]
    assert len(leaf) == 1 and leaf[0].status == "depth" and leaf[0].depth == 4 and leaf[0].reward == -1.0
    assert tree.root.q == -1.0 and tree.exhausted and tree.simulations == 4
    # a final answer as step max_depth + 1 is still graded (as in the source)
    mcts, (tree,) = search(ScriptedPolicy(unique=False, script=[FILL, RIGHT]), simulations=20, max_depth=1, width=2)
    deep = [n for n in tree.nodes if n.depth == 2]
    assert sorted((n.status, n.reward) for n in deep) == [("depth", -1.0), ("end", 1.0)]


def test_custom_rewards_and_truncated_steps():
    class Truncating(ScriptedPolicy):
        def sample_steps(self, prompt_ids, partial_ids, width):
            groups = super().sample_steps(prompt_ids, partial_ids, width)
            for g in groups:
                g[0].truncated, g[0].ends_response, g[0].text = True, False, "cut"
            return groups

    _, (tree,) = search(Truncating(unique=False, script=[RIGHT, RIGHT]), simulations=3, width=2,
                        positive_reward=2.0, negative_reward=-0.5)
    assert sorted((tree.nodes[c].status, tree.nodes[c].reward) for c in tree.root.children) == [
        ("end", 2.0), ("length", -0.5)]
    assert tree.root.W == 1.5 and tree.root.N == 2


# ------------------------------------------------------------------------------ batching
def test_waves_batch_trees_and_virtual_loss_picks_distinct_leaves():
    policy = ScriptedPolicy((0.8, 0.1, 0.1), seed=2)
    mcts, trees = search(policy, n_trees=5, simulations=12, leaves_per_tree=3, max_depth=6)
    assert policy.calls == mcts.stats.waves
    assert mcts.stats.expansions == mcts.stats.simulations == sum(t.simulations for t in trees)
    assert mcts.stats.waves <= 5  # 12 simulations at up to 3 per wave: 4 waves, +1 if a tree stalls
    assert mcts.stats.backups == sum(t.root.N for t in trees)
    assert mcts.stats.generated_tokens == 2 * 5 * mcts.stats.simulations
    for t in trees:  # every expanded node was expanded once: children come in one batch of 5
        assert all(len(n.children) in (0, 5) for n in t.nodes)


# ------------------------------------------------------------------------------ (f) files
def test_save_load_round_trip(tmp_path):
    mcts, trees = search(ScriptedPolicy(seed=4), n_trees=3, simulations=25, leaves_per_tree=2, max_depth=5)
    path = save_trees(tmp_path / "sub" / "trees.json", trees, meta={"c_puct": 1.5})
    loaded, meta = load_trees(path, return_meta=True)
    assert loaded == trees and meta == {"c_puct": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["trees.json"]  # no temp file left
    payload = json.loads(path.read_text())
    assert payload["format"] == "lit_reason.mcts_trees" and payload["version"] == 1
    # a loaded tree resumes
    more = StepMCTS(ScriptedPolicy(seed=9), simulations=30, max_depth=5)
    more.search(loaded, [{}] * 3)
    assert all(t.simulations == 30 for t in loaded)
    payload["version"] = 99
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="version"):
        load_trees(path)


# ------------------------------------------------------------------------------ (h) bad input
@pytest.mark.parametrize("kwargs, name", [
    ({"simulations": 0}, "simulations"), ({"width": 0}, "width"), ({"c_puct": -0.1}, "c_puct"),
    ({"max_depth": 0}, "max_depth"), ({"leaves_per_tree": 0}, "leaves_per_tree"),
    ({"virtual_loss": -1.0}, "virtual_loss"), ({"positive_reward": 0.0}, "positive_reward"),
    ({"negative_reward": 0.5}, "negative_reward"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StepMCTS(ScriptedPolicy(), **kwargs)


def test_bad_search_calls():
    mcts = StepMCTS(ScriptedPolicy())
    with pytest.raises(ValueError, match="simulations"):
        mcts.search(mcts.new_trees([[1]]), [{}], simulations=0)
    with pytest.raises(ValueError, match="examples"):
        mcts.search(mcts.new_trees([[1]]), [])
    with pytest.raises(ValueError, match="max_correct"):
        extract_rows([], max_correct=-1)


# ------------------------------------------------------------------------------ (g) real model
@pytest.fixture(scope="module")
def eos_model(tiny_model, tiny_tokenizer):
    """The tiny Llama with its (tied) EOS row scaled up, so untrained responses end after a few steps."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.embed_tokens.weight[tiny_tokenizer.eos_token_id] *= 16.0
    return model.eval()


def test_real_model_search_is_batched_per_wave(eos_model, tiny_tokenizer, tmp_path):
    task = ArithmeticTask(seed=0, n_train=10, n_validation=0, n_test=0)
    examples = task.examples("train")[:3]
    engine = RolloutEngine(eos_model, tiny_tokenizer, max_new_tokens=8, batch_size=64, seed=0)
    calls = []
    sample = engine.sample
    engine.sample = lambda *a, **k: calls.append(len(a[0])) or sample(*a, **k)
    splitter = StepSplitter(delimiter=" ")  # short steps from an untrained model
    proposer = LMStepProposer(engine, splitter, task)
    mcts = StepMCTS(proposer, simulations=4, width=3, max_depth=3, seed=0)
    trees = mcts.new_trees(encode_prompts(tiny_tokenizer, [task.prompt(e) for e in examples]))
    mcts.search(trees, examples)
    stats = mcts.stats
    assert len(calls) == stats.waves == proposer.sample_calls == proposer.forward_calls
    assert calls[0] == 3 and stats.expansions > stats.waves  # one engine call expands every tree
    assert stats.expansions == sum(t.simulations for t in trees) and stats.generated_tokens > 0
    assert stats.backups == sum(t.root.N for t in trees) > 0
    assert stats.as_dict()["tokens_per_s"] > 0
    # the priors' batched, padded forward equals a plain forward of one whole path
    tree = max(trees, key=lambda t: max(n.depth for n in t.nodes))
    leaf = max(range(len(tree.nodes)), key=lambda i: tree.nodes[i].depth)
    response = tree.response_ids(leaf)
    ids = torch.tensor([tree.prompt_ids + response])
    with torch.no_grad():
        full = response_logprobs(eos_model, ids, torch.ones_like(ids), len(tree.prompt_ids))[0]
    stored = [x for i in tree.path(leaf)[1:] for x in tree.nodes[i].logprobs]
    assert stored == pytest.approx(full.tolist(), abs=1e-4)
    for n in tree.nodes[1:]:
        assert n.prior == pytest.approx(sum(n.logprobs) / len(n.ids))
        assert n.terminal == (n.status != "open")
    assert load_trees(save_trees(tmp_path / "t.json", trees)) == trees
    # the convenience wrapper: prompts from the task, same batching
    calls.clear()
    trees, stats = run_mcts(engine, task, splitter, examples, prompt_indices=[5, 6, 7], simulations=2, width=2)
    assert [t.prompt_index for t in trees] == [5, 6, 7] and len(calls) == stats.waves <= 2
