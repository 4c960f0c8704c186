"""Tests of the batched KV-cache sampler (``RolloutEngine``) against plain full forward passes."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_reason.rollout.sampler import Generation, RolloutEngine, top_p_filter

pytestmark = pytest.mark.usefixtures("single_torch_thread")


PROMPTS = ["Compute: 12+34-5\n", "Compute: 1+2\n", "Hi"]


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model with larger random weights, so greedy output varies from token to token.

    At the default init scale the tiny model emits one token over and over, which would let a
    broken cache or wrong position ids go unnoticed.
    """
    m = copy.deepcopy(tiny_model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def naive_greedy(model, prefix, max_new, eos):
    """Greedy decoding the slow way: a full forward pass of the unpadded sequence per token."""
    seq, out = list(prefix), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
    return out


class ForceTokenAt:
    """Forward hook on ``lm_head``: at forward call ``call`` puts a huge logit on ``token`` for ``rows``.

    Call 0 is the prefill (it picks generated token 0); call i picks generated token i.
    """

    def __init__(self, token, call, rows=None):
        self.token, self.call, self.rows, self.calls = token, call, rows, 0

    def __call__(self, module, args, output):
        if self.calls == self.call:
            output = output.clone()
            rows = slice(None) if self.rows is None else self.rows
            output[rows, -1, self.token] = 1e4
        self.calls += 1
        return output


def test_greedy_equals_uncached_loop_for_prompts_of_different_lengths(model, tiny_tokenizer, prompt_ids):
    assert len({len(p) for p in prompt_ids}) == 3, "the prompts must need different amounts of left padding"
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=12, temperature=0)
    gens = engine.sample(prompt_ids, k=1)
    eos = tiny_tokenizer.eos_token_id
    for p, g in zip(prompt_ids, gens):
        expected = naive_greedy(model, p, 12, eos)
        assert g.ids == expected
        assert g.finish == ("eos" if expected[-1] == eos else "length")
    # the comparison is only meaningful if the outputs are not one repeated token
    assert all(len(set(g.ids)) > 3 for g in gens)
    assert engine.generated_tokens == sum(len(g.ids) for g in gens)


def test_greedy_k_copies_are_identical_and_equal_k1(model, tiny_tokenizer, prompt_ids):
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=0)
    single = engine.sample(prompt_ids, k=1)
    triple = engine.sample(prompt_ids, k=3)
    assert len(triple) == 3 * len(prompt_ids)
    for i, g in enumerate(single):  # prefix-major: [i*k, (i+1)*k) continue prefix i
        assert [t.ids for t in triple[3 * i : 3 * i + 3]] == [g.ids] * 3


def test_chunking_by_batch_size_does_not_change_greedy_output(model, tiny_tokenizer, prompt_ids):
    whole = RolloutEngine(model, tiny_tokenizer, max_new_tokens=8, temperature=0, batch_size=64).sample(prompt_ids, 2)
    chunked = RolloutEngine(model, tiny_tokenizer, max_new_tokens=8, temperature=0, batch_size=2).sample(prompt_ids, 2)
    assert [g.ids for g in chunked] == [g.ids for g in whole]


def test_continue_from_encodes_each_prefix_once(model, tiny_tokenizer, prompt_ids):
    prefixes = prompt_ids[:2]
    k, max_new = 4, 6
    shapes = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=max_new, temperature=1.0, seed=3)
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gens = engine.continue_from(prefixes, k)
    finally:
        handle.remove()
    width = max(len(p) for p in prefixes)
    assert shapes[0] == (2, width)  # the prefill sees N rows, not N*k
    assert all(s == (2 * k, 1) for s in shapes[1:])  # then one token per sequence per step
    assert len(shapes) <= max_new
    assert len(gens) == 2 * k
    for i in range(2):
        draws = {tuple(g.ids) for g in gens[i * k : (i + 1) * k]}
        assert len(draws) > 1, "k samples of one prefix should be separate draws, not copies"


def test_reseed_reproduces_and_other_seeds_differ(model, tiny_tokenizer, prompt_ids):
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=1.0)
    engine.reseed(7)
    a = [g.ids for g in engine.sample(prompt_ids, 2)]
    b_after = [g.ids for g in engine.sample(prompt_ids, 2)]  # the generator moved on
    engine.reseed(7)
    b = [g.ids for g in engine.sample(prompt_ids, 2)]
    engine.reseed(8)
    c = [g.ids for g in engine.sample(prompt_ids, 2)]
    fresh = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=1.0, seed=7)
    assert a == b
    assert a == [g.ids for g in fresh.sample(prompt_ids, 2)]
    assert a != c
    assert a != b_after


def test_top_p_filter_hand_example():
    probs = torch.tensor([[0.2, 0.5, 0.3]])  # deliberately unsorted
    logits = probs.log()

    def kept(top_p):
        return torch.isfinite(top_p_filter(logits, top_p))[0].tolist()

    # nucleus 0.6: 0.5 alone is short of 0.6, so 0.3 is needed too; 0.2 is outside
    assert kept(0.6) == [False, True, True]
    # nucleus 0.4: the top token alone reaches it
    assert kept(0.4) == [False, True, False]
    # nucleus 0.85: 0.5 + 0.3 = 0.8 < 0.85, so all three
    assert kept(0.85) == [True, True, True]
    assert kept(1.0) == [True, True, True]
    # a tiny nucleus keeps the top token rather than emptying the row; kept logits are unchanged
    out = top_p_filter(logits, 1e-9)
    assert torch.isfinite(out).sum() == 1 and out[0, 1] == logits[0, 1]
    flat = torch.zeros(2, 5)  # all tied: still at least one survivor per row
    assert (torch.isfinite(top_p_filter(flat, 0.01)).sum(-1) >= 1).all()


def test_stop_string_ends_generation(model, tiny_tokenizer, prompt_ids):
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=12, temperature=0)
    greedy = engine.sample(prompt_ids, 1)
    row = 2  # the "Hi" prompt: its first greedy tokens decode to plain text
    stop = tiny_tokenizer.decode(greedy[row].ids[:2])
    assert stop.strip() and stop.isprintable(), f"pick another row: {stop!r}"
    stopped = engine.sample(prompt_ids, 1, stop_strings=[stop])
    for g, s in zip(greedy, stopped):
        # expected: the greedy output cut right after the first token whose text completes `stop`
        cut = next((n for n in range(1, len(g.ids) + 1) if stop in tiny_tokenizer.decode(g.ids[:n])), None)
        if cut is None:
            assert s.ids == g.ids and s.finish == g.finish
        else:
            assert s.ids == g.ids[:cut] and s.finish == "stop"
    assert stopped[row].finish == "stop" and len(stopped[row].ids) <= 2
    assert any(s.finish == "length" for s in stopped)  # rows without the text run on


def test_eos_finishes_only_its_row(model, tiny_tokenizer, prompt_ids):
    eos = tiny_tokenizer.eos_token_id
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=0)
    greedy = engine.sample(prompt_ids, 1)
    assert all(eos not in g.ids for g in greedy)
    # the model itself is steered: row 0 gets a huge EOS logit at its third token
    hook = model.lm_head.register_forward_hook(ForceTokenAt(eos, call=2, rows=[0]))
    try:
        forced = engine.sample(prompt_ids, 1)
    finally:
        hook.remove()
    assert forced[0].ids == greedy[0].ids[:2] + [eos]
    assert forced[0].finish == "eos" and forced[0].finished
    # the other rows keep decoding exactly as before while row 0 is padded
    assert [g.ids for g in forced[1:]] == [g.ids for g in greedy[1:]]
    assert all(g.finish == "length" and not g.finished for g in forced[1:])


def test_all_rows_eos_at_first_token_stops_after_prefill(model, tiny_tokenizer, prompt_ids):
    eos = tiny_tokenizer.eos_token_id
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=1.0)
    force = ForceTokenAt(eos, call=0)
    hook = model.lm_head.register_forward_hook(force)
    try:
        gens = engine.sample(prompt_ids, 2)
    finally:
        hook.remove()
    assert [g.ids for g in gens] == [[eos]] * 6
    assert {g.finish for g in gens} == {"eos"}
    assert force.calls == 1  # nothing left to decode after the prefill


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, r"\bk\b"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_sample_arguments(model, tiny_tokenizer, prompt_ids, kwargs, name):
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=4)
    with pytest.raises(ValueError, match=name):
        engine.sample(prompt_ids, **kwargs)


def test_empty_prefix_is_rejected(model, tiny_tokenizer, prompt_ids):
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=4)
    with pytest.raises(ValueError, match="prefix 1 is empty"):
        engine.continue_from([prompt_ids[0], []], 2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_engine_arguments(model, tiny_tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        RolloutEngine(model, tiny_tokenizer, **kwargs)


def test_generation_finished_flag():
    assert Generation([1], "eos").finished and Generation([1], "stop").finished
    assert not Generation([1], "length").finished


def test_prefill_computes_last_logits_only_and_samples_as_the_full_logits(model, tiny_tokenizer, prompt_ids, monkeypatch):
    import lit_reason.rollout.sampler as sampler

    def run():
        shapes = []
        hook = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
        try:
            gens = RolloutEngine(model, tiny_tokenizer, max_new_tokens=8, temperature=1.0, seed=4).sample(prompt_ids, 2)
        finally:
            hook.remove()
        return [(g.ids, g.finish) for g in gens], shapes

    last_only, shapes = run()
    width, vocab = max(len(p) for p in prompt_ids), model.config.vocab_size
    assert shapes[0] == (3, 1, vocab)  # the prefill: one position per prompt, not `width`
    monkeypatch.setattr(sampler, "_last_logits_kwargs", lambda model: {})
    full, full_shapes = run()
    assert full_shapes[0] == (3, width, vocab)
    assert full == last_only


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dropping_finished_rows_changes_no_token(model, tiny_tokenizer, prompt_ids, temperature):
    eos = tiny_tokenizer.eos_token_id

    def run(drop):
        shapes = []
        engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=8, temperature=temperature, seed=2,
                               drop_finished=drop)
        # rows 0 and 1 of the 3 prompts x 2 samples end at their second token: 2 of 6 finished
        force = model.lm_head.register_forward_hook(ForceTokenAt(eos, call=1, rows=[0, 1]))
        record = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
        try:
            gens = engine.sample(prompt_ids, 2)
        finally:
            force.remove()
            record.remove()
        return [(g.ids, g.finish) for g in gens], shapes, engine.generated_tokens

    kept, kept_rows, kept_count = run(False)
    dropped, dropped_rows, dropped_count = run(True)
    assert [f for _, f in kept[:2]] == ["eos", "eos"] and all(len(ids) == 2 for ids, _ in kept[:2])
    assert kept_rows == [3] + [6] * 7  # prefill, then every row decodes (finished ones padded)
    assert dropped_rows == [3, 6] + [4] * 6  # the two finished rows leave after the step that ended them
    assert dropped == kept  # the same tokens, greedy and sampled (each row keeps its random draws)
    assert dropped_count == kept_count == 2 * 2 + 4 * 8


class CountingTokenizer:
    """The tiny tokenizer, counting ``decode`` calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids, **kwargs):
        self.decoded += 1
        return self.tokenizer.decode(ids, **kwargs)


def test_stop_strings_decode_only_live_rows_and_nothing_without_stop_strings(model, tiny_tokenizer, prompt_ids):
    eos = tiny_tokenizer.eos_token_id
    tok = CountingTokenizer(tiny_tokenizer)
    engine = RolloutEngine(model, tok, max_new_tokens=6, temperature=0, drop_finished=False)
    engine.sample(prompt_ids, 1)
    assert tok.decoded == 0  # no stop strings: no text is decoded
    hook = model.lm_head.register_forward_hook(ForceTokenAt(eos, call=1, rows=[0]))
    try:
        gens = engine.sample(prompt_ids, 1, stop_strings=["\x00never"])
    finally:
        hook.remove()
    assert gens[0].finish == "eos" and len(gens[0].ids) == 2
    # step 0 decodes all 3 rows; row 0 ends by EOS at step 1 (not decoded), then 2 rows x 5 steps
    assert tok.decoded == 3 + 2 * 5


def test_sampled_logprobs_are_a_full_forward_pass_at_the_temperature(model, tiny_tokenizer, prompt_ids):
    """The sampler's per-token log-probs (PPO's old log-probs) equal re-scoring each response alone.

    Full vocabulary at temperature 0.7 although top-p 0.9 cuts what is sampled; rows of padded
    prompts of three lengths; two rows end early so the others' log-probs come from the shrunken
    batch after finished rows leave.
    """
    T = 0.7
    eos = tiny_tokenizer.eos_token_id
    engine = RolloutEngine(model, tiny_tokenizer, max_new_tokens=10, temperature=T, top_p=0.9, seed=3)
    force = model.lm_head.register_forward_hook(ForceTokenAt(eos, call=1, rows=[0, 1]))
    try:
        gens = engine.sample(prompt_ids, 2)
    finally:
        force.remove()
    assert [len(g.ids) for g in gens[:2]] == [2, 2] and all(len(g.ids) == 10 for g in gens[2:])
    for j, g in enumerate(gens):
        prefix = prompt_ids[j // 2]
        with torch.no_grad():
            logits = model(torch.tensor([list(prefix) + g.ids])).logits[0, len(prefix) - 1 : -1]
        expected = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(g.ids)[:, None]).squeeze(-1)
        got = torch.tensor(g.logprobs)
        if j < 2:  # the forced EOS is not the model's own choice
            expected, got = expected[:1], got[:1]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    greedy = RolloutEngine(model, tiny_tokenizer, max_new_tokens=4, temperature=0).sample(prompt_ids[:1])
    assert greedy[0].logprobs is None
