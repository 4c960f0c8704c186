"""Synthetic multi-step arithmetic chains: the embedded default task (no data files needed).

A question such as ``12+34-5`` is evaluated LEFT TO RIGHT, with no operator precedence, one
step per operator::

    Compute: 12+34-5
    12+34=46
    46-5=41
    Answer: 41

The format has no spaces so that a digit-level tokenizer spends its tokens on digits.
"""

from __future__ import annotations

import itertools
import random
import re

from lit_reason.tasks.base import SPLITS, Task

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# The integer right after "Answer:"; the look-ahead rejects a decimal such as "41.5" rather than
# read it as 41 (or, backtracking, as 4).
_INTEGER_RE = re.compile(r"[ \t]*([+-]?)[ \t]*(\d+)(?!\d|\.\d)")

# The final-answer cues real instruct models write: "Answer: 12", "the answer is 12.", "The answer
# is: 12", "#### 12", "\boxed{12}" (markdown bold and "$" around the number are skipped). The LAST
# cue in a response holds the answer.
_ANSWER_CUE_RE = re.compile(r"(?:(?<![A-Za-z])[Aa]nswer(?:\s+is)?[ \t]*:?|####|\\boxed\s*\{)[ \t*$]*")

DEFAULT_CHAT_INSTRUCTION = (
    "Evaluate the expression from left to right, one operation per line, and end with the line 'Answer: N'."
)
CHAT_EXAMPLE = ("Compute: 2+5-3", "2+5=7\n7-3=4\nAnswer: 4")


def evaluate_chain(operands: list[int], operators: list[str]) -> list[int]:
    """Returns the running values of a left-to-right chain: one per operator.

    Example:
        ``evaluate_chain([12, 34, 5], ["+", "-"]) == [46, 41]``.
    """
    value, values = operands[0], []
    for op, operand in zip(operators, operands[1:]):
        value = _APPLY[op](value, operand)
        values.append(value)
    return values


def _question(operands, operators) -> str:
    parts = [str(operands[0])]
    for op, operand in zip(operators, operands[1:]):
        parts += [op, str(operand)]
    return "".join(parts)


class ArithmeticTask(Task):
    """Left-to-right arithmetic chains generated deterministically from a seed.

    Args:
        seed: Seed of the generator; the same seed (and knobs) gives the same rows.
        num_operands: Operands per question: an int, or an inclusive ``(min, max)`` range;
            at least 2.
        digits: Operands are drawn uniformly from ``0 .. 10**digits - 1``.
        operators: The operators to draw from: any non-empty subset of ``"+-*"``.
        n_train: Rows in the train split.
        n_validation: Rows in the validation split.
        n_test: Rows in the test split.
        prompt_format: ``plain`` (``Compute: 12+34-5\\n``, the default), ``chat`` or a dict (see
            :mod:`lit_reason.tasks.prompt_format`); chat prompts ask for the plain format's
            response (default instruction: a one-shot example).

    The three splits have pairwise distinct questions. Test is drawn first, then validation,
    then train, so changing ``n_train`` leaves test and validation unchanged.
    """

    name = "arithmetic"
    answer_prefix = "Answer:"
    chat_instruction = DEFAULT_CHAT_INSTRUCTION
    chat_example = CHAT_EXAMPLE

    def __init__(
        self,
        seed: int = 0,
        num_operands: int | tuple[int, int] = (3, 6),
        digits: int = 1,
        operators: str = "+-",
        n_train: int = 20000,
        n_validation: int = 500,
        n_test: int = 500,
        prompt_format: str | dict | None = None,
    ):
        self.set_prompt_format(prompt_format)
        self.seed = seed
        self.min_operands, self.max_operands = self._check_num_operands(num_operands)
        if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
            raise ValueError(f"digits must be an int >= 1, got {digits!r}")
        self.digits = digits
        if not isinstance(operators, str) or not operators or any(c not in _APPLY for c in operators):
            raise ValueError(f"operators must be a non-empty string of characters from '+-*', got {operators!r}")
        # Dedupe but keep the given order, so generation depends only on the set and its order.
        self.operators = "".join(dict.fromkeys(operators))
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        for split, n in self.sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"n_{split} must be an int >= 0, got {n!r}")
        capacity = self._capacity()
        total = sum(self.sizes.values())
        if total > capacity:
            raise ValueError(
                f"n_train + n_validation + n_test = {total} exceeds the {capacity} distinct questions that "
                f"digits={digits}, num_operands={num_operands!r}, operators={operators!r} allow"
            )
        self._rows: dict[str, list[dict]] | None = None

    @staticmethod
    def _check_num_operands(num_operands) -> tuple[int, int]:
        if isinstance(num_operands, int) and not isinstance(num_operands, bool):
            lo = hi = num_operands
        elif isinstance(num_operands, (tuple, list)) and len(num_operands) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) for n in num_operands
        ):
            lo, hi = num_operands
        else:
            raise ValueError(
                f"num_operands must be an int or an inclusive (min, max) pair of ints, got {num_operands!r}"
            )
        if lo < 2 or hi < lo:
            raise ValueError(f"num_operands must be >= 2 (and min <= max), got {num_operands!r}")
        return lo, hi

    def _capacity(self) -> int:
        """How many distinct questions the knobs allow."""
        values, n_ops = 10**self.digits, len(self.operators)
        return sum(values**n * n_ops ** (n - 1) for n in range(self.min_operands, self.max_operands + 1))

    def _generate(self) -> dict[str, list[dict]]:
        rng = random.Random(self.seed)
        total = sum(self.sizes.values())
        if self._capacity() <= 4 * total:
            # Few distinct questions: rejection sampling would stall on repeats, so list them all.
            pool = list(self._enumerate())
            rng.shuffle(pool)
            chains = iter(pool)
        else:
            chains = self._sample(rng)
        seen: set[str] = set()
        rows: dict[str, list[dict]] = {}
        for split in ("test", "validation", "train"):
            out = rows[split] = []
            while len(out) < self.sizes[split]:
                operands, ops = next(chains)
                question = _question(operands, ops)
                if question in seen:
                    continue
                seen.add(question)
                answer = evaluate_chain(operands, ops)[-1]
                out.append({"question": question, "operands": operands, "operators": ops, "answer": str(answer)})
        return rows

    def _sample(self, rng: random.Random):
        values, counts = range(10**self.digits), range(self.min_operands, self.max_operands + 1)
        while True:
            # One choices() call per list: about three times faster than a randint() per item.
            n = rng.choice(counts)
            yield rng.choices(values, k=n), rng.choices(self.operators, k=n - 1)

    def _enumerate(self):
        values = range(10**self.digits)
        for n in range(self.min_operands, self.max_operands + 1):
            for operands in itertools.product(values, repeat=n):
                for ops in itertools.product(self.operators, repeat=n - 1):
                    yield list(operands), list(ops)

    def examples(self, split: str) -> list[dict]:
        """Returns the rows of ``split``: ``question``, ``operands``, ``operators``, ``answer``."""
        self._check_split(split, SPLITS)
        if self._rows is None:
            self._rows = self._generate()
        return self._rows[split]

    def plain_prompt(self, example: dict) -> str:
        """Returns ``"Compute: {question}\\n"``."""
        return f"Compute: {self._field(example, 'question')}\n"

    def reference_solution(self, example: dict) -> str:
        """Returns one ``a op b=c`` line per operator, then ``Answer: N``."""
        operands = self._field(example, "operands")
        ops = self._field(example, "operators")
        if len(operands) != len(ops) + 1:
            raise ValueError(f"arithmetic example has {len(operands)} operands but {len(ops)} operators")
        values = evaluate_chain(operands, ops)
        lefts = [operands[0]] + values[:-1]
        lines = [f"{a}{op}{b}={c}" for a, op, b, c in zip(lefts, ops, operands[1:], values)]
        lines.append(f"Answer: {values[-1]}")
        return "\n".join(lines)

    def reference_answer(self, example: dict) -> str:
        """Returns the row's ``answer`` (an integer, as a string)."""
        return str(self._field(example, "answer"))

    def extract_answer(self, text: str) -> str | None:
        """Returns the integer after the LAST answer cue, normalised (``"+041"`` -> ``"41"``), or None.

        Cues: ``Answer: N`` (the gold format), ``the answer is N.``, ``The answer is: N``, ``#### N``,
        ``\\boxed{N}``. When the last cue holds no integer there is no answer, even if an earlier one did.
        """
        cues = list(_ANSWER_CUE_RE.finditer(text))
        if not cues:
            return None
        match = _INTEGER_RE.match(text, cues[-1].end())
        if match is None:  # the last answer line holds no integer: no answer, even if earlier ones did
            return None
        sign, digits = match.groups()
        return str(int(sign + digits))

    def step_correctness(self, example: dict, steps: list[str]) -> list[bool]:
        """Exact process labels: is the response error-free up to and including each step?

        A response line is correct when it equals the reference line at the same position
        (``a op b=c``, whitespace around it ignored); the ``Answer:`` line is correct when its
        integer matches the gold answer. Once a line is wrong, every later step is labelled False
        (the running value is wrong from there on), even if the final answer is right by accident.
        Blank lines are ignored; a line past the reference's last one is an error.

        Args:
            example: A row of this task.
            steps: The response's steps as text, in order (e.g. the spans of a StepSplitter; a
                step may hold several lines).

        Returns:
            One bool per step.
        """
        reference = self.reference_solution(example).split("\n")
        gold = self.reference_answer(example)
        labels, ok, line_index = [], True, 0
        for step in steps:
            for line in (part.strip() for part in step.split("\n")):
                if not line or not ok:
                    continue
                if line.startswith(self.answer_prefix):
                    predicted = self.extract_answer(line)
                    ok = predicted is not None and self.answers_match(predicted, gold)
                else:
                    ok = line_index < len(reference) - 1 and line == reference[line_index]
                line_index += 1
            labels.append(ok)
        return labels

    def answers_match(self, predicted: str, gold: str) -> bool:
        """Exact integer equality."""
        try:
            return int(predicted) == int(gold)
        except ValueError:
            return False

    def __repr__(self) -> str:
        lo, hi = self.min_operands, self.max_operands
        return (
            f"ArithmeticTask(seed={self.seed}, num_operands={(lo, hi)}, digits={self.digits}, "
            f"operators={self.operators!r}, n_train={self.sizes['train']}, "
            f"n_validation={self.sizes['validation']}, n_test={self.sizes['test']}{self._format_repr()})"
        )
