"""GSM8K: grade-school word problems with a numeric answer on a final ``#### N`` line."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from lit_reason.tasks.base import DatasetTask
from lit_reason.tasks.math import extract_boxed

# Calculator annotations such as "<<48/2=24>>": the gold data has them, a small model should not
# have to learn to emit them.
_ANNOTATION_RE = re.compile(r"<<[^<>\n]*>>")

# A number as people write it: optional minus and "$", thousands commas, decimals, "a/b".
# The look-behind stops "16-3" from yielding "-3" and "x2" from yielding "2".
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>-)?\$?(?P<sign2>-)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?"
    r"(?:/(?P<den>\d+)(?![\d.]))?"
)

# Phrases that introduce a final answer in model responses; the last one wins.
_ANSWER_CUE_RE = re.compile(r"(?<![A-Za-z])A:|[Aa]nswer\s*(?:is|:)")

DEFAULT_CHAT_INSTRUCTION = "Solve the problem step by step, one step per line, and end with the line 'Answer: N'."

_TOLERANCE = 1e-6


def parse_number(match: re.Match) -> Fraction | None:
    """Turns a `_NUMBER_RE` match into an exact Fraction (None for ``x/0``)."""
    text = match["int"].replace(",", "") + ("." + match["frac"] if match["frac"] else "")
    value = Fraction(text)
    if match["den"]:
        if int(match["den"]) == 0:
            return None
        value /= int(match["den"])
    return -value if (match["sign"] or match["sign2"]) else value


def format_number(value: Fraction) -> str:
    """Canonical text of a number: ``72``, ``-3.5``, or ``1/3`` when no finite decimal exists."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    sign, value = ("-" if value < 0 else ""), abs(value)
    whole, rest = divmod(value.numerator, value.denominator)
    digits = ""
    while rest:
        rest *= 10
        digit, rest = divmod(rest, value.denominator)
        digits += str(digit)
    return f"{sign}{whole}.{digits}"


def first_number(text: str) -> Fraction | None:
    """The first number in ``text``, or None."""
    for match in _NUMBER_RE.finditer(text):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def last_number(text: str) -> Fraction | None:
    """The last number in ``text``, or None."""
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        value = parse_number(match)
        if value is not None:
            return value
    return None


class GSM8KTask(DatasetTask):
    """GSM8K word problems.

    Args:
        path: A folder holding ``train.jsonl``/``test.jsonl`` (validation: the last 200 rows of
            train, which train then excludes), or one jsonl file used as the test split only.
        dataset: A Hugging Face Hub dataset name for `datasets.load_dataset` (e.g.
            ``"openai/gsm8k"``), instead of ``path``.
        dataset_config: The Hub dataset's config.
        prompt_format: ``plain`` (``Question: ...\\nAnswer:\\n``, the default), ``chat`` or a dict
            (see :mod:`lit_reason.tasks.prompt_format`); a chat prompt's question is the row's
            ``question`` alone.

    With neither ``path`` nor ``dataset``, ``gsm8k/`` under `lit_reason.paths.default_data_dir`
    is used, else the Hub dataset ``openai/gsm8k``.
    """

    name = "gsm8k"
    answer_prefix = "####"
    default_folder = "gsm8k"
    default_dataset = "openai/gsm8k"
    required_fields = ("question", "answer")
    validation_holdout = 200
    chat_instruction = DEFAULT_CHAT_INSTRUCTION

    def __init__(self, path: str | Path | None = None, dataset: str | None = None, dataset_config: str = "main",
                 prompt_format: str | dict | None = None):
        super().__init__(path=path, dataset=dataset, dataset_config=dataset_config, prompt_format=prompt_format)

    def plain_prompt(self, example: dict) -> str:
        """Returns ``"Question: {question}\\nAnswer:\\n"``."""
        return f"Question: {self._field(example, 'question')}\nAnswer:\n"

    def question_text(self, example: dict) -> str:
        """The row's ``question`` (the user turn of a chat prompt)."""
        return str(self._field(example, "question")).strip()

    def reference_solution(self, example: dict) -> str:
        """Returns the gold ``answer`` without calculator annotations, ending in ``#### N``."""
        answer = str(self._field(example, "answer"))
        lines = [line.rstrip() for line in _ANNOTATION_RE.sub("", answer).strip().split("\n")]
        return "\n".join(line for line in lines if line)

    def reference_answer(self, example: dict) -> str:
        """Returns the number after ``####`` in the gold ``answer``, normalised (``1,000`` -> ``1000``)."""
        answer = str(self._field(example, "answer"))
        if "####" not in answer:
            raise ValueError(f"gsm8k example's 'answer' has no '####' line: {answer[-80:]!r}")
        value = first_number(answer.rsplit("####", 1)[1])
        if value is None:
            raise ValueError(f"gsm8k example's 'answer' has no number after '####': {answer[-80:]!r}")
        return format_number(value)

    def extract_answer(self, text: str) -> str | None:
        """Returns the final number of a response, normalised, or None.

        Looks, in order, after the last ``####``; in the last ``\\boxed{}``; after the last ``A:`` /
        ``answer is`` / ``answer:``; else takes the last number anywhere. Commas, ``$``, trailing
        ``.``/``.00`` and units after the number are handled.
        """
        text = _ANNOTATION_RE.sub("", text)
        segments = []
        if "####" in text:
            segments.append(text.rsplit("####", 1)[1])
        boxed = extract_boxed(text)
        if boxed is not None:
            segments.append(boxed)
        cues = list(_ANSWER_CUE_RE.finditer(text))
        if cues:
            segments.append(text[cues[-1].end() :])
        for segment in segments:
            value = first_number(segment)
            if value is not None:
                return format_number(value)
        value = last_number(text)
        return None if value is None else format_number(value)

    def answers_match(self, predicted: str, gold: str) -> bool:
        """Numeric equality within 1e-6 (exact for fractions)."""
        try:
            a, b = Fraction(predicted), Fraction(gold)
        except (ValueError, ZeroDivisionError):
            return predicted.strip() == gold.strip()
        return abs(a - b) <= _TOLERANCE
