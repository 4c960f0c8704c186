"""Tests of the step segmentation shared by rollouts, value targets, losses and search."""

from __future__ import annotations

import random
import time

import pytest

from lit_reason import steps as steps_mod
from lit_reason.steps import POLICIES, StepSplitter

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)

MATH_SOLUTION = (
    "The slope of the line is $\\frac{3-1}{2-0} = 1$. So the equation is $y = x + 1$. "
    "Thus, when $x = 3.5$, we get\n"
    "$$\ny = 4.5. Then\nz = 2.\n$$\n"
    "We also note that\n"
    "\\begin{align*}\na &= 1. B \\\\\nb &= 2.\n\\end{align*}\n"
    "It costs \\$5. Since \\[ x. Y \\] holds, [asy]\ndraw((0,0)--(1,1)). Label\n[/asy] fine.\n"
    "The answer is $\\boxed{4.5}$."
)

INPUTS = [
    "",
    "\n",
    "\n\n\n",
    "abc",
    "\n\nabc",
    "a\n\n\nb",
    "a\nb",
    "a\nb\n",
    "a\r\nb\r\n",
    "  \n  x\n \t \ny\n\n",
    "12+3=15\nAnswer: 15",
    GSM8K_SOLUTION,
    MATH_SOLUTION,
    "Step one.\n\nStep two\nstill two.\n\n\n\nStep three.",
    "Héllo € 😀\nnext ✓\n",
]

SPLITTERS = [
    StepSplitter(),
    StepSplitter(answer_prefix="####"),
    StepSplitter(answer_prefix="Answer:"),
    StepSplitter("double_newline"),
    StepSplitter("math"),
    StepSplitter("math", answer_prefix="The answer is"),
    StepSplitter(delimiter="; "),
    StepSplitter("custom", delimiter="\n\n"),
]


def reference_step_ids(char_spans: list[tuple[int, int]], token_spans: list[tuple[int, int]], n_chars: int) -> list[int]:
    """Brute-force statement of the token -> step rule, written independently of the module."""
    out: list[int] = []
    for s, e in token_spans:
        if not char_spans:
            out.append(0)
        elif e <= s:
            out.append(len(char_spans) - 1 if s >= n_chars else (out[-1] if out else 0))
        else:
            owner = [k for k, (a, b) in enumerate(char_spans) if a <= s < b]
            out.append(owner[0] if owner else len(char_spans) - 1)
    return out


def reference_step_ends(step_ids: list[int]) -> list[int]:
    return [i for i in range(len(step_ids)) if i == len(step_ids) - 1 or step_ids[i + 1] != step_ids[i]]


# ----------------------------------------------------------------------------- text splitting


@pytest.mark.parametrize("splitter", SPLITTERS, ids=repr)
@pytest.mark.parametrize("text", INPUTS, ids=[f"text{i}" for i in range(len(INPUTS))])
def test_split_invariants(splitter: StepSplitter, text: str) -> None:
    steps = splitter.split(text)
    spans = splitter.char_spans(text)
    assert "".join(steps) == text
    assert [text[s:e] for s, e in spans] == steps
    if not text:
        assert steps == [] and spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s0, e0), (s1, _e1) in zip(spans, spans[1:]):
        assert e0 == s1
    assert all(e > s for s, e in spans)
    # No step is only whitespace unless the whole text is.
    if text.strip():
        assert all(step.strip() for step in steps)


def test_newline_attachment_rules() -> None:
    sp = StepSplitter()
    assert sp.split("") == []
    assert sp.split("\n\nabc") == ["\n\nabc"]
    assert sp.split("a\n\n\nb") == ["a\n\n\n", "b"]
    assert sp.split("a\nb") == ["a\n", "b"]
    assert sp.split("a\nb\n") == ["a\n", "b\n"]
    assert sp.split("a\r\nb\r\n") == ["a\r\n", "b\r\n"]
    assert sp.split("a\n  \nb") == ["a\n  \n", "b"]
    assert sp.split("\n\n") == ["\n\n"]
    assert sp.char_spans("a\n\n\nb") == [(0, 4), (4, 5)]


def test_answer_prefix_merging() -> None:
    assert StepSplitter(answer_prefix="Answer:").split("12+3=15\nAnswer: 15") == ["12+3=15\nAnswer: 15"]
    assert StepSplitter().split("12+3=15\nAnswer: 15") == ["12+3=15\n", "Answer: 15"]
    # Leading spaces before the prefix are ignored; a first-step answer stays on its own.
    assert StepSplitter(answer_prefix="Answer:").split("x\n   Answer: 1") == ["x\n   Answer: 1"]
    assert StepSplitter(answer_prefix="Answer:").split("Answer: 1\nmore") == ["Answer: 1\n", "more"]
    # Blank lines before the answer line go with the previous step and do not block the merge.
    assert StepSplitter(answer_prefix="####").split("a\nb\n\n#### 5\n") == ["a\n", "b\n\n#### 5\n"]


def test_gsm8k_real_solution() -> None:
    lines = GSM8K_SOLUTION.split("\n")
    with_prefix = StepSplitter(answer_prefix="####").split(GSM8K_SOLUTION)
    assert with_prefix == [lines[0] + "\n", lines[1] + "\n#### 72"]
    without = StepSplitter().split(GSM8K_SOLUTION)
    assert without == [lines[0] + "\n", lines[1] + "\n", "#### 72"]


def test_double_newline() -> None:
    sp = StepSplitter("double_newline")
    text = "Step one.\n\nStep two\nstill two.\n\n\n\nStep three."
    assert sp.split(text) == ["Step one.\n\n", "Step two\nstill two.\n\n\n\n", "Step three."]
    assert sp.split("\n\nA\n\nB") == ["\n\nA\n\n", "B"]
    assert sp.split("one line\nno paragraph") == ["one line\nno paragraph"]
    assert sp.split("a\r\n\r\nb\n \nc") == ["a\r\n\r\n", "b\n \n", "c"]


def test_custom_delimiter() -> None:
    sp = StepSplitter(delimiter="; ")
    assert sp.policy == "custom"
    assert sp.split("a; b; ; c") == ["a; ", "b; ; ", "c"]
    assert StepSplitter("custom", delimiter="<step>").split("x<step>y<step><step>z<step>") == [
        "x<step>",
        "y<step><step>",
        "z<step>",
    ]
    # A delimiter that never occurs leaves one step.
    assert sp.split("no delimiter here") == ["no delimiter here"]


def test_math_policy_real_solution() -> None:
    steps = StepSplitter("math").split(MATH_SOLUTION)
    assert "".join(steps) == MATH_SOLUTION
    assert steps[0] == "The slope of the line is $\\frac{3-1}{2-0} = 1$. "
    assert steps[1] == "So the equation is $y = x + 1$. "
    # The period inside $x = 3.5$ does not split; the display block (with its own periods,
    # capitals and newlines) stays whole and, being short, merges with what follows.
    assert steps[2] == "Thus, when $x = 3.5$, we get\n"
    assert steps[3].startswith("$$\ny = 4.5. Then\nz = 2.\n$$\n")
    # An environment with periods and line breaks stays in one step.
    assert any("\\begin{align*}\na &= 1. B \\\\\nb &= 2.\n\\end{align*}\n" in s for s in steps)
    # \$ is a literal dollar, \[..\] and [asy]..[/asy] are hidden.
    assert "It costs \\$5. " in steps
    assert any(s.startswith("Since \\[ x. Y \\] holds, [asy]\ndraw((0,0)--(1,1)). Label\n[/asy] fine.") for s in steps)
    assert steps[-1] == "The answer is $\\boxed{4.5}$."
    for s in steps[:-1]:
        stripped = s.strip()
        assert len(stripped) >= 20 or stripped.endswith("."), s


def test_math_policy_sentences_and_short_parts() -> None:
    sp = StepSplitter("math")
    # A short part without a full stop is glued to the next; a short sentence with one is kept.
    assert sp.split("We have\nx = 1 so y = 2 follows.\nOk.\nDone here now") == [
        "We have\nx = 1 so y = 2 follows.\n",
        "Ok.\n",
        "Done here now",
    ]
    # Decimals and lower-case continuations are not sentence ends.
    assert sp.split("It is 3.5 units. the end is near. Now stop.") == ["It is 3.5 units. the end is near. ", "Now stop."]
    # An unclosed "$" (truncated generation) does not hide the rest.
    assert sp.split("First we compute $x = 1 more text.\nSecond line here is long.") == [
        "First we compute $x = 1 more text.\n",
        "Second line here is long.",
    ]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="sentences") as err:
        StepSplitter("sentences")
    for policy in POLICIES:
        assert policy in str(err.value)
    with pytest.raises(ValueError, match="delimiter"):
        StepSplitter(delimiter="")
    with pytest.raises(ValueError, match="delimiter"):
        StepSplitter("custom")
    with pytest.raises(ValueError, match="delimiter"):
        StepSplitter("math", delimiter=";")
    with pytest.raises(ValueError, match="answer_prefix"):
        StepSplitter(answer_prefix="")


# ----------------------------------------------------------------------------- token mapping (spans given)


def test_token_step_ids_rules() -> None:
    sp = StepSplitter()
    text = "ab\ncd\nef"  # steps [0,3) [3,6) [6,8)
    spans = [(0, 0), (0, 2), (2, 4), (4, 4), (4, 6), (6, 8), (8, 8), (8, 8)]
    ids = sp.token_step_ids(spans, text)
    # BOS-like empty span at start -> 0; "\nc" starts in step 0; an empty span mid-text follows
    # the previous token; EOS/padding at the end -> last step.
    assert ids == [0, 0, 0, 0, 1, 2, 2, 2]
    assert ids == reference_step_ids(sp.char_spans(text), spans, len(text))
    assert sp.step_ends(ids) == [3, 4, 7]
    assert sp.token_step_ids([(0, 0), (0, 0)], "") == [0, 0]
    assert sp.token_step_ids([], text) == []
    assert sp.step_ends([]) == []
    # A step entirely inside one token owns no token and is dropped from step_ends.
    assert sp.step_ends([0, 0, 2, 2, 3]) == [1, 3, 4]


# ----------------------------------------------------------------------------- byte-level BPE tokenizer


TOKEN_TEXTS = [
    GSM8K_SOLUTION,
    MATH_SOLUTION,
    "Compute: 12 + 30\n12 + 30 = 42\nAnswer: 42\n",
    "\n\nleading blank\n\n\nand trailing\n\n",
    "Café costs 3€ 🙂🙂\nnaïve résumé ✓ 中文\n\nend",
]


@pytest.mark.parametrize("splitter", SPLITTERS, ids=repr)
@pytest.mark.parametrize("text", TOKEN_TEXTS, ids=[f"text{i}" for i in range(len(TOKEN_TEXTS))])
def test_tiny_tokenizer_alignment(tiny_tokenizer, splitter: StepSplitter, text: str) -> None:
    tok = tiny_tokenizer
    char_spans = splitter.char_spans(text)

    # From text (offsets).
    token_ids, step_ids, ends = splitter.token_steps_from_text(tok, text)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(step_ids) == len(token_ids) == len(offsets)
    assert step_ids == reference_step_ids(char_spans, offsets, len(text))
    assert ends == reference_step_ends(step_ids)
    assert step_ids == sorted(step_ids)

    # From ids (decoding), with EOS appended as a generated response would have it.
    ids = token_ids + [tok.eos_token_id]
    decoded, spans = splitter.token_char_spans_from_ids(tok, ids)
    assert decoded == text
    assert len(spans) == len(ids)
    assert spans[-1] == (len(text), len(text))  # EOS: empty span at the end
    assert "".join(decoded[s:e] for s, e in spans) == decoded
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    text_out, step_ids2, ends2 = splitter.token_steps(tok, ids)
    assert text_out == text
    assert step_ids2 == reference_step_ids(char_spans, spans, len(text))
    assert step_ids2[-1] == max(len(char_spans) - 1, 0)  # EOS gets the last step
    assert step_ids2[:-1] == step_ids  # decoding agrees with the offsets on every real token
    assert ends2 == reference_step_ends(step_ids2)
    assert len(ends2) == len(set(step_ids2))


def test_multibyte_utf8_spans(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    text = "é€😀\n€é\n🙂 x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The byte-level vocabulary splits these characters into several byte tokens.
    assert len(ids) > len(text)
    decoded, spans = StepSplitter().token_char_spans_from_ids(tok, ids)
    assert decoded == text
    pieces = [decoded[s:e] for s, e in spans]
    assert "".join(pieces) == text
    assert "" in pieces  # tokens holding only leading bytes get empty spans...
    assert "😀" in pieces and "€" in pieces  # ...and the completing token gets the whole character
    # Each of the three strategies gives the same exact pieces.
    full = steps_mod._decode(tok, ids)
    by_bytes = steps_mod._pieces_byte_level(tok, ids, full)
    windowed = steps_mod._pieces_windowed(tok, ids, full)
    prefix_text, prefix = steps_mod._pieces_prefix(tok, ids)
    assert by_bytes == windowed == prefix == pieces and prefix_text == text


def test_truncated_character_and_special_tokens(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    ids = tok("ok 😀", add_special_tokens=False)["input_ids"]
    cut = ids[:-1]  # stop in the middle of the emoji's bytes, then EOS
    for seq in (cut, cut + [tok.eos_token_id], [tok.bos_token_id] + ids + [tok.eos_token_id, tok.pad_token_id]):
        full = steps_mod._decode(tok, seq)
        results = [
            steps_mod._pieces_byte_level(tok, seq, full),
            steps_mod._pieces_windowed(tok, seq, full),
            steps_mod._pieces_prefix(tok, seq)[1],
        ]
        assert all(r is not None and "".join(r) == full for r in results)
        assert results[0] == results[1] == results[2]
        special = {tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}
        assert all(p == "" for p, t in zip(results[0], seq) if t in special)


def test_fallback_to_prefix_decoding(tiny_tokenizer, monkeypatch) -> None:
    tok = tiny_tokenizer
    text = "a\nb €\n"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected = StepSplitter().token_steps(tok, ids)
    monkeypatch.setattr(steps_mod, "_pieces_byte_level", lambda *a: None)
    monkeypatch.setattr(steps_mod, "_pieces_windowed", lambda *a: None)
    assert StepSplitter().token_steps(tok, ids) == expected


def test_one_thousand_tokens_is_fast(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    rng = random.Random(0)
    lines = [f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1999)} é€\n" for _ in range(120)]
    ids = tok("".join(lines), add_special_tokens=False)["input_ids"][:1000] + [tok.eos_token_id]
    assert len(ids) > 900
    sp = StepSplitter()
    t0 = time.perf_counter()
    text, step_ids, ends = sp.token_steps(tok, ids)
    elapsed = time.perf_counter() - t0
    assert len(step_ids) == len(ids) and step_ids[-1] == len(sp.split(text)) - 1
    assert elapsed < 1.0, elapsed
    # The quadratic fallback still agrees on this length.
    assert steps_mod._pieces_prefix(tok, ids)[0] == text


# ----------------------------------------------------------------------------- tokens straddling a newline


def _straddling_tokenizer():
    """A byte-level BPE whose merges cross newlines (no pre-tokenizer split on whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = []
    for _ in range(300):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        corpus.append(f"We add {a} and {b}.\nThen we get {a + b}.\nThen we stop.\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def straddling_tokenizer():
    return _straddling_tokenizer()


def test_token_straddling_newline(straddling_tokenizer) -> None:
    tok = straddling_tokenizer
    text = "We add 2 and 3.\nThen we get 5.\nThen we stop."
    sp = StepSplitter()
    char_spans = sp.char_spans(text)
    assert len(char_spans) == 3

    def check(spans: list[tuple[int, int]], step_ids: list[int], ends: list[int]) -> None:
        crossing = [i for i, (s, e) in enumerate(spans) if "\n" in text[s:e] and not text[s:e].endswith("\n")]
        assert crossing, "the tokenizer should merge across a newline"
        for i in crossing:
            s, e = spans[i]
            first_step = next(k for k, (a, b) in enumerate(char_spans) if a <= s < b)
            assert step_ids[i] == first_step  # owned by the step of its first character
            assert step_ids[i + 1] == first_step + 1  # the next step starts at the next token
            assert i in ends
        assert step_ids == reference_step_ids(char_spans, spans, len(text))
        assert ends == reference_step_ends(step_ids)

    # From text: offsets.
    token_ids, step_ids, ends = sp.token_steps_from_text(tok, text)
    offsets = [tuple(o) for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    check(offsets, step_ids, ends)

    # From ids: decoding, with EOS at the end getting the last step.
    ids = token_ids + [tok.eos_token_id]
    decoded, spans = sp.token_char_spans_from_ids(tok, ids)
    assert decoded == text and spans[:-1] == offsets and spans[-1] == (len(text), len(text))
    text_out, step_ids2, ends2 = sp.token_steps(tok, ids)
    assert text_out == text and step_ids2[-1] == 2 and step_ids2[:-1] == step_ids
    check(spans, step_ids2, ends2)
    assert ends2 == ends[:-1] + [len(ids) - 1]


# ----------------------------------------------------------------------------- a non-byte-level decoder


def test_metaspace_tokenizer_uses_windowed_decoding() -> None:
    """SentencePiece-style decoding (strips the leading "\u2581") is exact through the windowed path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat.\nthe dog ate 12 apples.\n"] * 50
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )
    ids = tok("the cat sat.\nthe dog ate 12 apples.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    full = steps_mod._decode(tok, ids)
    assert steps_mod._pieces_byte_level(tok, ids, full) is None  # not byte-level: skipped
    windowed = steps_mod._pieces_windowed(tok, ids, full)
    assert windowed is not None and windowed == steps_mod._pieces_prefix(tok, ids)[1]
    text, step_ids, ends = StepSplitter().token_steps(tok, ids)
    assert text == full and "\n" in text
    assert step_ids[-1] == len(StepSplitter().split(text)) - 1
    assert len(ends) == len(StepSplitter().split(text))
