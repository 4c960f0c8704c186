"""Tests of the trajectory batch (rollouts into it, grading, padding, save/load, select, concat)
and of the Monte Carlo state values computed from it."""

from __future__ import annotations

import pickle

import pytest
import torch

from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.monte_carlo import mc_step_values, mc_values, step_states
from lit_reason.rollout.sampler import Generation, RolloutEngine
from lit_reason.rollout.trajectories import build_batch, encode_prompts, rollout
from lit_reason.steps import StepSplitter
from lit_reason.tasks import get_task


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", n_train=50, n_validation=10, n_test=10)


@pytest.fixture(scope="module")
def splitter():
    return StepSplitter(answer_prefix="Answer:")


class ForceEOS:
    """Forward hook on ``lm_head``: the rows ``rows`` get a huge EOS logit at forward call ``call``."""

    def __init__(self, eos, call, rows):
        self.eos, self.call, self.rows, self.calls = eos, call, rows, 0

    def __call__(self, module, args, output):
        if self.calls == self.call:
            output = output.clone()
            output[self.rows, -1, self.eos] = 1e4
        self.calls += 1
        return output


@pytest.fixture(scope="module")
def sampled(tiny_model, tiny_tokenizer, task, splitter):
    """A real rollout (3 prompts x k=2) where rows 0 and 3 are made to emit EOS as their 4th token.

    Returns ``(batch, generations, examples, prompt_ids)``; the generations are the same draws the
    rollout made (same seed), sampled again directly.
    """
    examples = task.examples("test")[:3]
    prompt_ids = encode_prompts(tiny_tokenizer, [task.prompt(e) for e in examples])
    engine = RolloutEngine(tiny_model, tiny_tokenizer, max_new_tokens=12, temperature=1.0)
    results = []
    for run in ("direct", "rollout"):
        hook = tiny_model.lm_head.register_forward_hook(ForceEOS(tiny_tokenizer.eos_token_id, 3, [0, 3]))
        try:
            engine.reseed(11)
            if run == "direct":
                results.append(engine.sample(prompt_ids, 2))
            else:
                results.append(rollout(engine, task, splitter, examples, k=2))
        finally:
            hook.remove()
    gens, batch = results
    return batch, gens, examples, prompt_ids


def check_step_layout(batch: TrajectoryBatch) -> None:
    """Invariants of response_mask / step_ids / step_ends / num_steps every batch must satisfy."""
    for b in range(len(batch)):
        m = int(batch.response_mask[b].sum())
        assert batch.response_mask[b, :m].eq(1).all() and batch.response_mask[b, m:].eq(0).all()
        ids = batch.step_ids[b]
        assert ids[m:].eq(-1).all() and ids[:m].ge(0).all()
        assert ids[0] == 0 and (ids[1:m] - ids[: m - 1]).ge(0).all(), "step ids must be nondecreasing"
        T = int(batch.num_steps[b])
        assert T >= 1 and int(ids[:m].max()) == T - 1
        ends = batch.step_ends[b]
        assert ends[T:].eq(-1).all()
        for s in range(T):
            assert int(ends[s]) == int((ids == s).nonzero().max()), f"row {b} step {s}"
        assert int(ends[T - 1]) == m - 1
        # attention covers exactly the real prompt and response tokens
        P = batch.prompt_len
        assert batch.attention_mask[b, P:].tolist() == batch.response_mask[b].long().tolist()


def test_rollout_batch_matches_generations(sampled, tiny_tokenizer, task):
    batch, gens, examples, prompt_ids = sampled
    B = len(gens)
    P = max(len(p) for p in prompt_ids)
    L = max(len(g.ids) for g in gens)
    assert len(batch) == B == 6
    assert batch.prompt_len == P
    assert batch.input_ids.shape == batch.attention_mask.shape == (B, P + L)
    assert batch.response_mask.shape == batch.step_ids.shape == (B, L)
    assert batch.step_ends.shape == (B, int(batch.num_steps.max()))
    for t in (batch.num_steps, batch.rewards, batch.finished, batch.group_ids):
        assert t.shape == (B,)
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.finished.tolist() == [g.finished for g in gens]
    # the forced EOS rows finished, the others ran into the length limit
    assert [g.finish for g in gens] == ["eos", "length", "length", "eos", "length", "length"]
    assert gens[0].ids[-1] == tiny_tokenizer.eos_token_id and len(gens[0].ids) == 4
    pad = tiny_tokenizer.pad_token_id
    for b, g in enumerate(gens):
        p = prompt_ids[b // 2]
        assert batch.input_ids[b, P - len(p) : P].tolist() == p
        assert batch.input_ids[b, : P - len(p)].eq(pad).all()
        assert batch.attention_mask[b, :P].tolist() == [0] * (P - len(p)) + [1] * len(p)
        # response_mask marks exactly the generated tokens (EOS included)
        assert batch.response_mask[b].tolist() == [1.0] * len(g.ids) + [0.0] * (L - len(g.ids))
        assert batch.response_ids[b, : len(g.ids)].tolist() == g.ids
        assert batch.response_ids[b, len(g.ids) :].eq(pad).all()
        assert batch.responses[b] == tiny_tokenizer.decode(g.ids, skip_special_tokens=True)
        assert batch.prompts[b] == task.prompt(examples[b // 2])
        assert batch.examples[b] is examples[b // 2]
    check_step_layout(batch)


def test_rollout_rewards(sampled, task):
    batch, gens, examples, _ = sampled
    for b, g in enumerate(gens):
        if g.finished:
            assert float(batch.rewards[b]) == task.reward(batch.responses[b], examples[b // 2])
        else:
            assert float(batch.rewards[b]) == 0.0


SHORT_EXAMPLES = [
    {"question": "1+2-3", "operands": [1, 2, 3], "operators": ["+", "-"], "answer": "0"},
    {"question": "9-8+7", "operands": [9, 8, 7], "operators": ["-", "+"], "answer": "8"},
    {"question": "5+5+5", "operands": [5, 5, 5], "operators": ["+", "+"], "answer": "15"},
]


def make_known_batch(tokenizer, splitter, task, examples=None):
    """Hand-built: a correct finished solution, a wrong finished one, a correct but truncated one."""
    examples = task.examples("test")[:3] if examples is None else examples
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    gens = [
        Generation(ids(task.reference_solution(examples[0])) + [eos], "eos"),
        Generation(ids(task.reference_solution(examples[0])) + [eos], "eos"),  # example 0's answer for 1
        Generation(ids(task.reference_solution(examples[2])), "length"),
    ]
    return build_batch(tokenizer, splitter, task, prompt_ids, prompts, examples, gens, k=1), examples, gens


def test_build_batch_grades_known_responses(tiny_tokenizer, splitter, task):
    batch, examples, gens = make_known_batch(tiny_tokenizer, splitter, task)
    assert examples[0]["answer"] != examples[1]["answer"]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0]
    assert batch.finished.tolist() == [True, True, False]
    assert batch.responses[0] == task.reference_solution(examples[0])
    # "a op b=c" lines are steps; "Answer: N" is merged into the last one
    lines = task.reference_solution(examples[0]).count("\n")
    assert int(batch.num_steps[0]) == lines
    assert int(batch.num_steps[2]) == task.reference_solution(examples[2]).count("\n")
    # the EOS belongs to the last step and is scored
    m0 = len(gens[0].ids)
    assert float(batch.response_mask[0, m0 - 1]) == 1.0 and int(batch.step_ids[0, m0 - 1]) == lines - 1
    check_step_layout(batch)


def test_build_batch_rejects_bad_generations(tiny_tokenizer, splitter, task):
    examples = task.examples("test")[:2]
    prompts = [task.prompt(e) for e in examples]
    pids = encode_prompts(tiny_tokenizer, prompts)
    with pytest.raises(ValueError, match="expected 4 generations"):
        build_batch(tiny_tokenizer, splitter, task, pids, prompts, examples, [Generation([5], "eos")] * 3, k=2)
    with pytest.raises(ValueError, match="generation 1 is empty"):
        build_batch(tiny_tokenizer, splitter, task, pids, prompts, examples,
                    [Generation([5], "eos"), Generation([], "length")], k=1)


def assert_batches_equal(a: TrajectoryBatch, b: TrajectoryBatch) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and value.dtype == other.dtype, name
            assert torch.equal(value, other), name
        else:
            assert value == other, name


def test_save_load_round_trip(sampled, tmp_path):
    batch = sampled[0]
    batch.old_logprobs = torch.randn(batch.response_mask.shape)
    try:
        path = tmp_path / "sub" / "traj.pt"
        batch.save(path)
        assert sorted(p.name for p in path.parent.iterdir()) == ["traj.pt"]  # no temp file left
        loaded = TrajectoryBatch.load(path)
        assert_batches_equal(batch, loaded)
        assert loaded.ref_logprobs is None and loaded.advantages is None
        batch.save(path)  # overwriting is fine and also leaves no temp file
        assert sorted(p.name for p in path.parent.iterdir()) == ["traj.pt"]
    finally:
        batch.old_logprobs = None


def test_load_rejects_truncated_and_foreign_files(sampled, tmp_path):
    good = tmp_path / "good.pt"
    sampled[0].save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        TrajectoryBatch.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"input_ids": torch.zeros(2, 3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*format"):
        TrajectoryBatch.load(foreign)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="plain.pkl"):
        TrajectoryBatch.load(plain)
    text = tmp_path / "notes.txt"
    text.write_text("not a batch\n")
    with pytest.raises(ValueError, match="notes.txt"):
        TrajectoryBatch.load(text)
    incomplete = tmp_path / "incomplete.pt"
    state = sampled[0].state_dict()
    del state["step_ends"]
    torch.save(state, incomplete)
    with pytest.raises(ValueError, match="step_ends"):
        TrajectoryBatch.load(incomplete)


def test_extras_follow_select_concat_and_disk(sampled, tmp_path):
    a, b = sampled[0].select([0, 1]), sampled[0].select([2, 3, 4])
    b = TrajectoryBatch.concat([b], pad_token_id=0)  # same rows, own tensors
    for batch, width in ((a, 2), (b, 3)):  # per-step extras of different widths, one per-row extra
        batch.extras = {"per_step": torch.arange(len(batch) * width, dtype=torch.float).view(len(batch), width) + 1,
                        "per_row": torch.arange(len(batch))}
    sub = b.select([2, 0])
    assert torch.equal(sub.extras["per_step"], b.extras["per_step"][[2, 0]])
    assert torch.equal(sub.extras["per_row"], torch.tensor([2, 0]))
    joined = TrajectoryBatch.concat([a, b], pad_token_id=0)
    # a's rows are right-padded with 0 from width 2 to 3: [1, 2, 0], [3, 4, 0]
    assert joined.extras["per_step"][:2].tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]
    assert torch.equal(joined.extras["per_step"][2:], b.extras["per_step"])
    assert joined.extras["per_row"].tolist() == [0, 1, 0, 1, 2]
    path = tmp_path / "extras.pt"
    joined.save(path)
    assert torch.equal(TrajectoryBatch.load(path).extras["per_step"], joined.extras["per_step"])
    a.extras = {}
    with pytest.raises(ValueError, match="extras differ"):
        TrajectoryBatch.concat([a, b], pad_token_id=0)


def test_a_file_with_the_old_per_method_fields_loads_them_into_extras(sampled, tmp_path):
    # step_values / returns / old_values were TrajectoryBatch fields before they moved into extras
    batch = sampled[0]
    state = batch.state_dict()
    state["step_values"] = torch.rand(batch.step_ends.shape)
    state["returns"] = torch.rand(batch.response_mask.shape)
    path = tmp_path / "old.pt"
    torch.save(state, path)
    loaded = TrajectoryBatch.load(path)
    assert torch.equal(loaded.extras["step_values"], state["step_values"])
    assert torch.equal(loaded.extras["returns"], state["returns"])
    assert not hasattr(loaded, "step_values")


class _NotATensor:
    pass


def test_load_never_unpickles_arbitrary_objects(sampled, tmp_path):
    state = sampled[0].state_dict()
    state["examples"] = [_NotATensor()]  # loading it would run this module's code: refused
    path = tmp_path / "objects.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="objects.pt"):
        TrajectoryBatch.load(path)


def test_select(sampled):
    batch = sampled[0]
    sub = batch.select([3, 0])
    assert len(sub) == 2 and sub.prompt_len == batch.prompt_len
    assert torch.equal(sub.input_ids, batch.input_ids[[3, 0]])
    assert torch.equal(sub.step_ends, batch.step_ends[[3, 0]])
    assert sub.rewards.tolist() == [batch.rewards[3].item(), batch.rewards[0].item()]
    assert sub.responses == [batch.responses[3], batch.responses[0]]
    assert sub.examples == [batch.examples[3], batch.examples[0]]
    assert sub.old_logprobs is None
    assert len(batch) == 6  # the original is untouched


def row_view(batch: TrajectoryBatch, b: int) -> dict:
    """One row without its padding."""
    P = batch.prompt_len
    m = int(batch.response_mask[b].sum())
    T = int(batch.num_steps[b])
    pmask = batch.attention_mask[b, :P].bool()
    view = {
        "prompt": batch.input_ids[b, :P][pmask].tolist(),
        "response": batch.input_ids[b, P : P + m].tolist(),
        "step_ids": batch.step_ids[b, :m].tolist(),
        "step_ends": batch.step_ends[b, :T].tolist(),
        "num_steps": T,
        "reward": float(batch.rewards[b]),
        "finished": bool(batch.finished[b]),
        "group": int(batch.group_ids[b]),
        "text": (batch.prompts[b], batch.responses[b], batch.examples[b]),
    }
    if batch.old_logprobs is not None:
        view["old_logprobs"] = batch.old_logprobs[b, :m].tolist()
    return view


def test_concat_repads_batches_of_different_shapes(sampled, tiny_tokenizer, splitter, task):
    a = sampled[0].select([0, 1, 2])
    b, _, _ = make_known_batch(tiny_tokenizer, splitter, task, SHORT_EXAMPLES)
    assert b.rewards.tolist() == [1.0, 0.0, 0.0]
    b = b.select([2, 1])
    # the two differ in every padded dimension
    assert a.prompt_len != b.prompt_len
    assert a.response_mask.shape[1] != b.response_mask.shape[1]
    assert a.step_ends.shape[1] != b.step_ends.shape[1]
    a.old_logprobs = torch.randn(a.response_mask.shape) * a.response_mask  # 0 off the mask
    b.old_logprobs = torch.randn(b.response_mask.shape) * b.response_mask
    pad = tiny_tokenizer.pad_token_id
    out = TrajectoryBatch.concat([a, b], pad)
    assert len(out) == 5
    assert out.prompt_len == max(a.prompt_len, b.prompt_len)
    assert out.response_mask.shape[1] == max(a.response_mask.shape[1], b.response_mask.shape[1])
    assert out.step_ends.shape[1] == max(a.step_ends.shape[1], b.step_ends.shape[1])
    # group ids of the second batch are offset past the first's, so prompts never merge
    offset = int(a.group_ids.max()) + 1
    b_rows = [{**row_view(b, i), "group": int(b.group_ids[i]) + offset} for i in range(len(b))]
    expected = [row_view(a, i) for i in range(len(a))] + b_rows
    assert [row_view(out, i) for i in range(len(out))] == expected
    assert set(out.group_ids[: len(a)].tolist()).isdisjoint(out.group_ids[len(a) :].tolist())
    check_step_layout(out)
    # padding outside the masks is pad / 0 / -1
    P = out.prompt_len
    for r in range(len(out)):
        m = int(out.response_mask[r].sum())
        assert out.input_ids[r, P + m :].eq(pad).all()
        n_prompt = int(out.attention_mask[r, :P].sum())
        assert out.input_ids[r, : P - n_prompt].eq(pad).all()
        assert out.old_logprobs[r, m:].eq(0).all()
    b.old_logprobs = None
    with pytest.raises(ValueError, match="old_logprobs"):
        TrajectoryBatch.concat([a, b], pad)
    with pytest.raises(ValueError):
        TrajectoryBatch.concat([], pad)


# ---- Monte Carlo values -----------------------------------------------------------------------


class ForceToken:
    """Forward hook on ``lm_head``: every row picks ``token`` at every step."""

    def __init__(self, token):
        self.token = token

    def __call__(self, module, args, output):
        output = output.clone()
        output[:, -1, self.token] = 1e4
        return output


def test_mc_values_dedupes_identical_states(tiny_model, tiny_tokenizer, task):
    examples = task.examples("test")[:2]
    p0, p1 = encode_prompts(tiny_tokenizer, [task.prompt(e) for e in examples])
    x = tiny_tokenizer("12", add_special_tokens=False)["input_ids"]
    prompts = [p0, p0, p1, p0, p1]
    partials = [[], [], [], x, []]  # unique states: (p0, []), (p1, []), (p0, x)
    rows_examples = [examples[0], examples[0], examples[1], examples[0], examples[1]]
    rows = []

    def record(module, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])

    hook = tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    engine = RolloutEngine(tiny_model, tiny_tokenizer, max_new_tokens=5, temperature=1.0)
    try:
        values = mc_values(engine, task, prompts, partials, rows_examples, k=3)
    finally:
        hook.remove()
    assert rows[0] == 3  # three unique prefixes are prefilled once each
    assert all(r == 9 for r in rows[1:])  # 3 states x k=3 continuations
    assert engine.generated_tokens <= 9 * 5
    assert values.shape == (5,)
    assert values[0] == values[1] and values[2] == values[4]
    assert ((values >= 0) & (values <= 1)).all()


def test_mc_values_hand_checked(tiny_model, tiny_tokenizer, task):
    """With the continuation forced to be EOS, V(S) is the reward of the partial response itself."""
    examples = task.examples("test")[:2]
    prompts = encode_prompts(tiny_tokenizer, [task.prompt(e) for e in examples])

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    right = ids(task.reference_solution(examples[0]))
    wrong = ids(task.reference_solution(examples[1]))
    states = ([prompts[0], prompts[0], prompts[1]], [right, wrong, []], [examples[0], examples[0], examples[1]])
    engine = RolloutEngine(tiny_model, tiny_tokenizer, max_new_tokens=3, temperature=1.0)
    hook = tiny_model.lm_head.register_forward_hook(ForceToken(tiny_tokenizer.eos_token_id))
    try:
        values = mc_values(engine, task, *states, k=2)
    finally:
        hook.remove()
    assert values.tolist() == [1.0, 0.0, 0.0]
    # a continuation that never ends (truncated) scores 0 even after a correct partial
    newline = ids("\n")[0]
    hook = tiny_model.lm_head.register_forward_hook(ForceToken(newline))
    try:
        values = mc_values(engine, task, [prompts[0]], [right], [examples[0]], k=2)
    finally:
        hook.remove()
    assert values.tolist() == [0.0]


def test_mc_values_bad_arguments(tiny_model, tiny_tokenizer, task):
    engine = RolloutEngine(tiny_model, tiny_tokenizer, max_new_tokens=3)
    ex = task.examples("test")[0]
    with pytest.raises(ValueError, match="k=0"):
        mc_values(engine, task, [[5, 6]], [[]], [ex], k=0)
    with pytest.raises(ValueError, match="same length"):
        mc_values(engine, task, [[5, 6]], [[], []], [ex], k=1)
    assert mc_values(engine, task, [], [], [], k=2).shape == (0,)


def test_step_states_lists_step_boundaries(tiny_tokenizer, splitter, task):
    batch, examples, gens = make_known_batch(tiny_tokenizer, splitter, task)
    states = step_states(batch)
    T = batch.num_steps.tolist()
    assert [s[0] for s in states] == [b for b in range(len(batch)) for _ in range(T[b])]
    prompts = encode_prompts(tiny_tokenizer, [task.prompt(e) for e in examples])
    for b, k, prompt, partial in states:
        assert prompt == prompts[b]  # unpadded
        if k == 0:
            assert partial == []
        else:
            end = int(batch.step_ends[b, k - 1])
            assert partial == gens[b].ids[: end + 1]
        # S_k is the response up to the end of its k-th line (each line is one step here)
        text = tiny_tokenizer.decode(partial, skip_special_tokens=True)
        lines = batch.responses[b].split("\n")
        assert text == "".join(line + "\n" for line in lines[:k])
    assert [s[1] for s in step_states(batch, max_steps=1)] == [0] * len(batch)
    assert len(step_states(batch, max_steps=2)) == sum(min(t, 2) for t in T)


def test_mc_step_values_fills_estimated_states(tiny_model, tiny_tokenizer, splitter, task):
    batch, _, _ = make_known_batch(tiny_tokenizer, splitter, task)
    engine = RolloutEngine(tiny_model, tiny_tokenizer, max_new_tokens=3, temperature=1.0)
    values, estimated = mc_step_values(engine, task, batch, k=2, max_steps=2)
    assert values.shape == estimated.shape == batch.step_ends.shape
    for b in range(len(batch)):
        expected = [s < min(int(batch.num_steps[b]), 2) for s in range(batch.step_ends.shape[1])]
        assert estimated[b].tolist() == expected
    assert values[~estimated].eq(0).all()
