"""Value-guided step beam search (OREO's test-time search, docs/oreo.md) and ``evaluate --search beam``.

Most tests drive the search with :class:`ScriptedEngine`, a stand-in for ``RolloutEngine`` whose
continuations are written by hand, and a value table keyed by response text, so every candidate,
value and kept beam can be checked by hand. The real tiny model checks the reduction B = 1, batching
with a deterministic engine, and the command end to end.
"""

from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch

from lit_reason.commands.evaluate import main as evaluate_main
from lit_reason.evaluation import (
    check_value_model_matches,
    evaluate_beam_search,
    format_table,
    load_search_value_fn,
)
from lit_reason.models.tiny import build_tiny_model, build_tokenizer
from lit_reason.models.value import ValueModel, lm_trunk
from lit_reason.rollout.sampler import Generation, RolloutEngine
from lit_reason.search import (
    first_step,
    sample_next_steps,
    value_guided_beam_search,
    value_model_fn,
)
from lit_reason.steps import StepSplitter
from lit_reason.tasks import get_task

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY_VALUE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


# ------------------------------------------------------------------------------ stand-ins


def split_prefix(text: str) -> tuple[str, str]:
    """(prompt, response) of a decoded prefix; every prompt here is one line ending in a newline."""
    prompt, response = text.split("\n", 1)
    return prompt + "\n", response


class ScriptedEngine:
    """Stand-in for ``RolloutEngine``: continuation j of a prefix is ``script(prompt, response, j)``.

    The script returns ``(text, eos)``. The engine tokenises the text (EOS appended when ``eos``),
    cuts it at ``max_new_tokens`` (finish ``"length"``), and records every call.
    """

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.calls: list[dict] = []
        self.generated = 0

    def sample(self, prefixes, k=1, temperature=None, top_p=None, max_new_tokens=None, stop_strings=None,
               desc=""):
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prefixes]
        self.calls.append({"prefixes": texts, "k": k, "temperature": temperature, "top_p": top_p,
                           "max_new_tokens": max_new_tokens, "stop_strings": stop_strings})
        out = []
        for text in texts:
            prompt, response = split_prefix(text)
            for j in range(k):
                cont, eos = self.script(prompt, response, j)
                ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
                ids = ids + [self.tokenizer.eos_token_id] if eos else ids
                finish = "eos" if eos else ("stop" if stop_strings and any(s in cont for s in stop_strings)
                                            else "length")
                if max_new_tokens is not None and len(ids) > max_new_tokens:
                    ids, finish = ids[:max_new_tokens], "length"
                self.generated += len(ids)
                out.append(Generation(ids=ids, finish=finish))
        return out


class TableValue:
    """A scripted value: ``table[response text]`` (``default`` otherwise); records every call."""

    def __init__(self, tokenizer, table=None, default=0.0, fn=None):
        self.tokenizer, self.table, self.default, self.fn = tokenizer, table or {}, default, fn
        self.calls: list[list[str]] = []

    def __call__(self, sequences):
        # special tokens kept, so a test can see whether an EOS reached the value function
        texts = [self.tokenizer.decode(s, skip_special_tokens=False) for s in sequences]
        self.calls.append([split_prefix(t)[1] for t in texts])
        if self.fn is not None:
            return torch.tensor([self.fn(t) for t in texts])
        return torch.tensor([self.table.get(split_prefix(t)[1], self.default) for t in texts])


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


class Bias:
    """Forward hook on ``lm_head`` adding fixed logits, so random tiny models end steps and responses."""

    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, module, args, output):
        output = output.clone()
        for token, b in self.bias.items():
            output[..., token] += b
        return output


@pytest.fixture(scope="module")
def steering_model(tiny_model, tiny_tokenizer):
    """The tiny model with larger random weights (so greedy output varies) and a bias towards newline
    and EOS (so steps and responses end within a few tokens)."""
    m = copy.deepcopy(tiny_model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    newline = encode(tiny_tokenizer, "\n")
    assert len(newline) == 1
    m.lm_head.register_forward_hook(Bias({newline[0]: 4.0, tiny_tokenizer.eos_token_id: 2.0}))
    return m


# ------------------------------------------------------------------------------ one step


def test_first_step_cuts_after_the_first_step(tiny_tokenizer):
    tok, splitter, eos = tiny_tokenizer, StepSplitter(), tiny_tokenizer.eos_token_id
    a = encode(tok, "a = 1\n")
    b = encode(tok, "b = 2\n")
    step = first_step(tok, splitter, Generation(ids=a + b, finish="stop"))
    assert (step.ids, step.terminal, step.capped, step.generated) == (a, False, False, len(a) + len(b))
    answer = encode(tok, "Answer: 3") + [eos]
    step = first_step(tok, splitter, Generation(ids=answer, finish="eos"))
    assert (step.ids, step.terminal, step.capped) == (answer, True, False)
    # an EOS after the first step is cut off with the rest: the step is not terminal
    step = first_step(tok, splitter, Generation(ids=a + answer, finish="eos"))
    assert (step.ids, step.terminal) == (a, False)
    step = first_step(tok, splitter, Generation(ids=encode(tok, "abc"), finish="length"))
    assert (step.ids, step.terminal, step.capped) == (encode(tok, "abc"), False, True)


def test_sample_next_steps_stops_at_the_delimiter(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, lambda p, r, j: (f"s{j}\nmore\n", False))
    steps = sample_next_steps(engine, StepSplitter(delimiter=";"), [encode(tiny_tokenizer, "Q\n")] * 2, k=3,
                              temperature=0.5, max_new_tokens=7)
    assert engine.calls[0]["stop_strings"] == [";"] and engine.calls[0]["k"] == 3
    assert (engine.calls[0]["temperature"], engine.calls[0]["max_new_tokens"]) == (0.5, 7)
    assert len(steps) == 6
    steps = sample_next_steps(engine, StepSplitter(), [encode(tiny_tokenizer, "Q\n")], k=2)
    assert engine.calls[-1]["stop_strings"] == ["\n"]
    assert [tiny_tokenizer.decode(s.ids) for s in steps] == ["s0\n", "s1\n"]  # cut after the first step


# ------------------------------------------------------------------------------ the search


def test_keeps_the_top_b_of_b_by_b_and_answers_the_pool_argmax(tiny_tokenizer):
    """B = 2, by hand. Round 1 expands the prompt (2 candidates); round 2 expands both beams (4 =
    B x B); the kept beams are the global top 2 of those 4, not the children of the best beam;
    round 3 finishes every candidate, so the pool holds 4 and the answer is its argmax."""
    tok = tiny_tokenizer

    def script(prompt, response, j):
        depth = response.count("\n")
        return (f"{'ab'[j]}\n", False) if depth < 2 else (f"Answer: {j}", True)

    values = TableValue(tok, {
        "a\n": 0.1, "b\n": 0.2,
        "b\na\n": 0.5, "b\nb\n": 0.05, "a\na\n": 0.3, "a\nb\n": 0.9,
        # finished candidates are valued without their EOS
        "a\nb\nAnswer: 0": 0.4, "a\nb\nAnswer: 1": 0.7, "b\na\nAnswer: 0": 0.8, "b\na\nAnswer: 1": 0.6,
    }, default=float("nan"))  # a lookup miss would raise (non-finite)
    engine = ScriptedEngine(tok, script)
    [res] = value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=2)

    assert [c["prefixes"] for c in engine.calls] == [
        ["Q\n"], ["Q\nb\n", "Q\na\n"], ["Q\na\nb\n", "Q\nb\na\n"]]  # beams in value order
    assert all(c["k"] == 2 and c["temperature"] == 1.0 and c["stop_strings"] == ["\n"] for c in engine.calls)
    assert values.calls == [
        ["a\n", "b\n"],
        ["b\na\n", "b\nb\n", "a\na\n", "a\nb\n"],  # B x B, beam-major
        ["a\nb\nAnswer: 0", "a\nb\nAnswer: 1", "b\na\nAnswer: 0", "b\na\nAnswer: 1"],
    ]
    assert res.text == "b\na\nAnswer: 0" and res.response_ids[-1] == tok.eos_token_id
    assert (res.value, res.finish, res.fallback) == (pytest.approx(0.8), "eos", False)
    assert (res.pool_size, res.steps, res.candidates, res.truncated) == (4, 3, 10, 0)
    assert res.generated_tokens == engine.generated


def test_finished_candidates_go_to_the_pool_not_the_beams(tiny_tokenizer):
    """A finished candidate stays in the pool whatever the unfinished values; the answer is the pool
    argmax even though the surviving beams are valued higher, and the search stops at max_steps."""
    tok = tiny_tokenizer

    def script(prompt, response, j):
        depth = response.count("\n")
        if depth == 0:
            return ("x\n", False) if j == 0 else ("Answer: 7", True)
        if depth == 1:
            return ("y\n", False) if j == 0 else ("Answer: 8", True)
        return (f"z{j}\n", False)

    values = TableValue(tok, {"Answer: 7": 0.05, "x\nAnswer: 8": 0.2, "x\ny\n": 0.6}, default=0.9)
    engine = ScriptedEngine(tok, script)
    [res] = value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=2, max_steps=3)
    # round 1: one finished, one beam; round 2: one finished, one beam; round 3: 2 unfinished beams
    assert [len(c) for c in values.calls] == [2, 2, 2]
    assert [c["prefixes"] for c in engine.calls] == [["Q\n"], ["Q\nx\n"], ["Q\nx\ny\n"]]
    assert (res.text, res.value, res.finish) == ("x\nAnswer: 8", pytest.approx(0.2), "eos")
    assert (res.pool_size, res.steps, res.candidates) == (2, 3, 6)


def test_empty_pool_falls_back_to_the_best_unfinished_candidate(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = ScriptedEngine(tok, lambda p, r, j: (f"s{j}\n", False))
    values = TableValue(tok, {"s0\ns0\n": 0.3, "s0\ns1\n": 0.1, "s1\ns0\n": 0.7, "s1\ns1\n": 0.2, "s0\n": 0.5})
    [res] = value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=2, max_steps=2)
    assert [len(c) for c in values.calls] == [2, 4]
    assert (res.text, res.value, res.finish, res.fallback) == ("s1\ns0\n", pytest.approx(0.7), "length", True)
    assert (res.pool_size, res.steps) == (0, 2)
    assert res.to_dict()["fallback"] is True


def test_length_limits(tiny_tokenizer):
    tok = tiny_tokenizer
    n = len(encode(tok, "abcdef\n"))
    assert n >= 2
    engine = ScriptedEngine(tok, lambda p, r, j: ("abcdef\n", False))
    values = TableValue(tok)
    [res] = value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=2, max_steps=5,
                                     max_new_tokens=2 * n - 1)
    # round 2 may only use the n - 1 tokens left: every candidate reaches the limit without EOS,
    # is dropped as truncated, and the search stops before max_steps with the fallback
    assert [c["max_new_tokens"] for c in engine.calls] == [2 * n - 1, n - 1]
    assert (res.steps, res.truncated, res.pool_size, res.finish) == (2, 4, 0, "length")
    assert len(res.response_ids) == 2 * n - 1

    # a step cut by max_step_tokens is not truncated: the next round continues it
    engine = ScriptedEngine(tok, lambda p, r, j: ("abcdef\n", False))
    [res] = value_guided_beam_search(engine, TableValue(tok), [encode(tok, "Q\n")], beam_size=1, max_steps=3,
                                     max_new_tokens=100, max_step_tokens=2)
    assert [c["max_new_tokens"] for c in engine.calls] == [2, 2, 2]
    assert (res.steps, res.truncated, len(res.response_ids)) == (3, 0, 6)


def test_value_at_eos_switch(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = ScriptedEngine(tok, lambda p, r, j: ("Answer: 1", True))
    values = TableValue(tok)
    value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=1)
    assert values.calls == [["Answer: 1"]]
    value_guided_beam_search(engine, values, [encode(tok, "Q\n")], beam_size=1, value_at_eos=True)
    assert values.calls[-1] == ["Answer: 1" + tok.eos_token]


def _prompt_dependent_script(prompt, response, j):
    """Prompt Qi finishes (one of its two samples) from round i + 1 on."""
    q, depth = int(prompt[1]), response.count("\n")
    if depth >= q and j == 0:
        return (f"Answer: {q}{depth}", True)
    return (f"s{j}{depth}\n", False)


def _hash_value(text: str) -> float:
    return (zlib.crc32(text.encode()) % 1000) / 1000


def test_batching_across_prompts_equals_one_prompt_at_a_time(tiny_tokenizer):
    """With an engine whose samples depend only on the prefix, batching changes nothing; every round
    is one engine call and one value call over all prompts still searching."""
    tok = tiny_tokenizer
    prompts = [encode(tok, f"Q{i}\n") for i in range(3)]
    engine, values = ScriptedEngine(tok, _prompt_dependent_script), TableValue(tok, fn=_hash_value)
    batched = value_guided_beam_search(engine, values, prompts, beam_size=2, max_steps=4)
    alone = [value_guided_beam_search(ScriptedEngine(tok, _prompt_dependent_script), TableValue(tok, fn=_hash_value),
                                      [p], beam_size=2, max_steps=4)[0] for p in prompts]
    assert [r.to_dict() for r in batched] == [r.to_dict() for r in alone]
    rounds = max(r.steps for r in batched)
    assert len(values.calls) == len(engine.calls) == rounds == 4
    # the value call of round t holds the candidates of every prompt expanded in round t
    for t in range(rounds):
        assert len(values.calls[t]) == 2 * len(engine.calls[t]["prefixes"])  # B samples of every beam
        assert {split_prefix(p)[0] for p in engine.calls[t]["prefixes"]} == {
            f"Q{i}\n" for i, r in enumerate(alone) if r.steps > t}
    assert [r.finish for r in batched] == ["eos", "eos", "eos"]


def test_batching_with_the_real_engine_at_temperature_zero(steering_model, tiny_tokenizer):
    """The real engine draws every row from one generator, so at T > 0 another batching gives other
    (identically distributed) samples; at T = 0 it is deterministic and batching changes nothing."""
    tok = tiny_tokenizer
    prompts = [encode(tok, p) for p in ["Compute: 1+2\n", "Compute: 3-4+5\n", "Compute: 9\n"]]
    values = TableValue(tok, fn=_hash_value)
    kwargs = dict(beam_size=2, max_steps=4, max_new_tokens=24, max_step_tokens=8, temperature=0.0)
    batched = value_guided_beam_search(RolloutEngine(steering_model, tok), values, prompts, **kwargs)
    alone = [value_guided_beam_search(RolloutEngine(steering_model, tok), values, [p], **kwargs)[0] for p in prompts]
    assert [r.to_dict() for r in batched] == [r.to_dict() for r in alone]


def test_beam_size_one_with_a_blind_value_is_sampling_one_step_at_a_time(steering_model, tiny_tokenizer):
    tok, splitter = tiny_tokenizer, StepSplitter()
    prompt = encode(tok, "Compute: 3-4+5\n")
    blind = TableValue(tok, default=0.0)
    [res] = value_guided_beam_search(RolloutEngine(steering_model, tok, seed=3), blind, [prompt], beam_size=1,
                                     max_steps=8, max_new_tokens=40, max_step_tokens=6)
    engine, response, terminal = RolloutEngine(steering_model, tok, seed=3), [], False
    for _ in range(8):
        [step] = sample_next_steps(engine, splitter, [prompt + response], 1,
                                   max_new_tokens=min(6, 40 - len(response)))
        response += step.ids
        if step.terminal or len(response) >= 40:
            terminal = step.terminal
            break
    assert res.response_ids == response
    assert res.finish == ("eos" if terminal else "length")
    assert all(len(c) == 1 for c in blind.calls)  # one candidate per round
    assert res.candidates == res.steps == len(blind.calls)
    assert res.steps >= 2  # the steering makes it a multi-step response


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_beam_size(tiny_tokenizer, bad):
    engine = ScriptedEngine(tiny_tokenizer, lambda p, r, j: ("a\n", False))
    with pytest.raises(ValueError, match="beam_size must be an int >= 1"):
        value_guided_beam_search(engine, TableValue(tiny_tokenizer), [[5]], beam_size=bad)
    assert engine.calls == []


def test_bad_arguments_and_bad_values(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = ScriptedEngine(tok, lambda p, r, j: ("a\n", False))
    q = [encode(tok, "Q\n")]
    with pytest.raises(ValueError, match="max_steps"):
        value_guided_beam_search(engine, TableValue(tok), q, beam_size=2, max_steps=0)
    with pytest.raises(ValueError, match="max_step_tokens"):
        value_guided_beam_search(engine, TableValue(tok), q, beam_size=2, max_step_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        value_guided_beam_search(engine, TableValue(tok), q + [[]], beam_size=2)
    with pytest.raises(ValueError, match=r"value_fn returned shape \(3,\) for 2 sequences"):
        value_guided_beam_search(engine, lambda seqs: torch.zeros(len(seqs) + 1), q, beam_size=2)
    with pytest.raises(ValueError, match="non-finite"):
        value_guided_beam_search(engine, lambda seqs: torch.full((len(seqs),), float("nan")), q, beam_size=2)
    assert value_guided_beam_search(engine, TableValue(tok), [], beam_size=2) == []


# ------------------------------------------------------------------------------ value models


def test_value_model_fn_reads_the_last_token(tiny_tokenizer):
    torch.manual_seed(0)
    model = ValueModel.from_policy_name("embedded:tiny", tiny=TINY_VALUE)
    model.train()
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    got = value_model_fn(model, tiny_tokenizer.pad_token_id, batch_size=1)(seqs)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
    model.eval()
    torch.testing.assert_close(got, model.values_of(seqs, tiny_tokenizer.pad_token_id).detach())
    model.train()
    value_model_fn(model, tiny_tokenizer.pad_token_id)(seqs)
    assert model.training  # the flag is restored


@pytest.fixture(scope="module")
def value_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("value") / "v"
    torch.manual_seed(0)
    ValueModel.from_policy_name("embedded:tiny", tiny=TINY_VALUE).save(path, tiny_tokenizer)
    return path


@pytest.fixture(scope="module")
def foreign_value_dir(tmp_path_factory):
    """A value model saved with another tokenizer (another vocabulary) than the policy's."""
    path = tmp_path_factory.mktemp("value_foreign") / "v"
    other = build_tokenizer(vocab_size=320)
    lm = build_tiny_model(other, **TINY_VALUE)
    ValueModel(lm_trunk(lm), TINY_VALUE["hidden_size"]).save(path, other)
    return path


def test_value_model_vocabulary_must_match(value_dir, foreign_value_dir, tiny_tokenizer, tmp_path):
    fn, model = load_search_value_fn(value_dir, tiny_tokenizer, policy_label="my-policy")
    assert fn([[5, 6, 7]]).shape == (1,)
    with pytest.raises(ValueError, match="does not match the policy my-policy") as err:
        load_search_value_fn(foreign_value_dir, tiny_tokenizer, policy_label="my-policy")
    assert str(foreign_value_dir) in str(err.value) and "tokenizers differ" in str(err.value)
    # no tokenizer saved: the embedding count is checked, and a warning says the rest is unchecked
    small = build_tiny_model(build_tokenizer(vocab_size=320), **TINY_VALUE)
    ValueModel(lm_trunk(small), TINY_VALUE["hidden_size"]).save(tmp_path / "small")
    with pytest.warns(UserWarning, match="no tokenizer"), pytest.raises(ValueError, match="embeds 320 token ids"):
        load_search_value_fn(tmp_path / "small", tiny_tokenizer, policy_label="my-policy")
    with pytest.warns(UserWarning, match="no tokenizer"):
        check_value_model_matches(tmp_path / "same", model, tiny_tokenizer, "my-policy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_search_value_fn(tmp_path / "missing", tiny_tokenizer)


# ------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", n_train=10, n_validation=5, n_test=5)


def test_evaluate_beam_search_hand_checked(tiny_tokenizer, task):
    """Every prompt gets two finished answers, example 0's and example 1's; the value prefers example
    0's. Example 2's prompt never finishes: its fallback states the right answer but counts as wrong."""
    examples = task.examples("test")[:3]
    a0, a1, a2 = (e["answer"] for e in examples)
    assert len({a0, a1}) == 2
    prompt2 = task.prompt(examples[2]).split("\n")[0] + "\n"

    def script(prompt, response, j):
        if prompt == prompt2:
            return (f"Answer: {a2}\n", False)
        return (f"Answer: {(a0, a1)[j]}", True)

    values = TableValue(tiny_tokenizer, fn=lambda text: 1.0 if text.endswith(f"Answer: {a0}") else 0.0)
    result = evaluate_beam_search(None, tiny_tokenizer, task, examples, values, beam_size=2, max_steps=2,
                                  greedy=False, engine=ScriptedEngine(tiny_tokenizer, script))
    r0, r1, r2 = result["records"]
    assert (r0["answer"], r0["correct"], r1["answer"], r1["correct"]) == (a0, True, a0, False)
    assert r2["answer"] == a2 and r2["fallback"] and r2["finish"] == "length" and r2["correct"] is False
    assert result["accuracy"] == pytest.approx(1 / 3) and result["fallbacks"] == 1
    assert (r0["pool_size"], r2["pool_size"], r2["steps"]) == (2, 0, 2)
    assert result["mean_pool_size"] == pytest.approx(4 / 3)
    assert result["generated_tokens"] == sum(r["generated_tokens"] for r in result["records"])
    assert "greedy_accuracy" not in result
    table = format_table(result, "scripted")
    assert "beam search pass@1 (B=2, max steps=2)" in table and "greedy" not in table


def _run(argv, capsys):
    code = evaluate_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_beam_search_end_to_end(tiny_policy_dir, value_dir, tmp_path, capsys):
    out = tmp_path / "beam.json"
    code, stdout, stderr = _run(["--policy", tiny_policy_dir, "--task", "arithmetic", "--limit", "2",
                                 "--search", "beam", "--value", str(value_dir), "--beam-size", "2",
                                 "--max-steps", "3", "--max-new-tokens", "12", "--max-step-tokens", "4",
                                 "--output", str(out)], capsys)
    assert code == 0, stderr
    assert "beam search pass@1 (B=2, max steps=3)" in stdout and "greedy pass@1" in stdout
    result = json.loads(out.read_text())
    assert (result["search"], result["n"], result["beam_size"], result["max_steps"]) == ("beam", 2, 2, 3)
    assert (result["value"], result["policy"], result["task"], result["split"]) == (
        str(value_dir), tiny_policy_dir, "arithmetic", "test")
    assert (result["max_new_tokens"], result["max_step_tokens"], result["splitter"]) == (12, 4, "newline")
    records = result["records"]
    assert len(records) == 2
    assert result["accuracy"] == sum(r["correct"] for r in records) / 2
    assert result["greedy_accuracy"] == sum(r["greedy"]["correct"] for r in records) / 2
    assert result["fallbacks"] == sum(r["fallback"] for r in records)
    for r in records:
        assert 1 <= r["steps"] <= 3 and r["candidates"] <= 2 + 4 + 4
        assert r["fallback"] == (r["finish"] == "length") == (r["pool_size"] == 0)
        assert r["generated_tokens"] >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["beam.json"]


@pytest.mark.parametrize("extra, culprit", [
    (["--search", "beam"], "--value"),
    (["--value", "VALUE"], "only apply to --search beam"),
    (["--beam-size", "2"], "--beam-size"),
    (["--search", "beam", "--value", "VALUE", "--beam-size", "0"], "--beam-size must be >= 1"),
    (["--search", "beam", "--value", "VALUE", "--samples", "2"], "--samples"),
    (["--search", "beam", "--value", "MISSING"], "MISSING"),
    (["--search", "beam", "--value", "FOREIGN"], "FOREIGN"),
    (["--search", "beam", "--value", "POLICY"], "value_head.json"),
])
def test_cli_bad_input_exits_2_naming_the_culprit(tiny_policy_dir, value_dir, foreign_value_dir, tmp_path, capsys,
                                                  extra, culprit):
    names = {"VALUE": str(value_dir), "MISSING": str(tmp_path / "missing"), "FOREIGN": str(foreign_value_dir),
             "POLICY": tiny_policy_dir}
    extra = [names.get(a, a) for a in extra]
    code, _stdout, stderr = _run(["--policy", tiny_policy_dir, "--task", "arithmetic", "--limit", "1",
                                  "--max-new-tokens", "4", *extra], capsys)
    assert code == 2
    # one error line, the last (transformers may print weight-loading progress before it)
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:]
    assert names.get(culprit, culprit) in errors[0]
    if culprit == "FOREIGN":
        assert tiny_policy_dir in errors[0]  # both the value folder and the policy are named
