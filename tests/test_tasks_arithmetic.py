"""The embedded arithmetic task: generation, format, grading and knob validation."""

from __future__ import annotations

import re

import pytest

from lit_reason.tasks import TASKS, ArithmeticTask, Task, get_task

SPLITS = ("train", "validation", "test")


def _left_to_right(question: str) -> int:
    """Independent evaluator: tokenise the question string and fold left to right."""
    tokens = re.findall(r"\d+|[+\-*]", question)
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
    return value


def _small(**kwargs) -> ArithmeticTask:
    return ArithmeticTask(**{"n_train": 300, "n_validation": 50, "n_test": 50, **kwargs})


def test_registry():
    assert TASKS["arithmetic"] is ArithmeticTask
    task = get_task("arithmetic", seed=3, n_train=10)
    assert isinstance(task, ArithmeticTask) and isinstance(task, Task)
    assert task.answer_prefix == "Answer:"
    with pytest.raises(ValueError, match="known tasks: .*arithmetic.*gsm8k.*math"):
        get_task("nope")


def test_default_sizes():
    # (generation speed is not asserted here: speed targets live in benchmarks/, never in tests)
    task = ArithmeticTask()
    sizes = {s: len(task.examples(s)) for s in SPLITS}
    assert sizes == {"train": 20000, "validation": 500, "test": 500}


def test_deterministic_per_seed():
    a, b, c = _small(seed=7), _small(seed=7), _small(seed=8)
    for split in SPLITS:
        assert a.examples(split) == b.examples(split)
    assert a.examples("train") != c.examples("train")


def test_splits_disjoint_and_unique():
    task = ArithmeticTask()
    questions = {s: [r["question"] for r in task.examples(s)] for s in SPLITS}
    for split in SPLITS:
        assert len(set(questions[split])) == len(questions[split]), f"duplicates within {split}"
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["validation"]) & set(questions["test"])


def test_test_split_independent_of_train_size():
    assert _small(n_train=10).examples("test") == _small(n_train=500).examples("test")


def test_rows_are_consistent_left_to_right():
    task = _small(operators="+-*", num_operands=(2, 5), digits=2)
    for row in task.examples("train"):
        assert row["question"] == "".join(
            str(x) for pair in zip(row["operands"], row["operators"] + [""]) for x in pair
        )
        assert int(row["answer"]) == _left_to_right(row["question"])
        assert task.reference_answer(row) == row["answer"]
        assert task.reward(task.reference_solution(row), row) == 1.0


def test_knobs_respected():
    task = _small(digits=3, num_operands=(2, 5), operators="*-")
    rows = task.examples("train")
    counts = {len(r["operands"]) for r in rows}
    assert counts == {2, 3, 4, 5}
    assert all(len(r["operators"]) == len(r["operands"]) - 1 for r in rows)
    operands = [x for r in rows for x in r["operands"]]
    assert max(operands) <= 999 and min(operands) >= 0 and max(operands) >= 100
    assert {op for r in rows for op in r["operators"]} == {"*", "-"}

    fixed = _small(num_operands=3, digits=1, operators="+")
    assert all(len(r["operands"]) == 3 and max(r["operands"]) <= 9 for r in fixed.examples("test"))
    assert all(set(r["operators"]) == {"+"} for r in fixed.examples("test"))


def test_small_space_is_enumerated_exactly():
    # 10 * 10 = 100 distinct "a+b" questions: all of them, split three ways, none repeated.
    task = ArithmeticTask(digits=1, num_operands=2, operators="+", n_train=80, n_validation=10, n_test=10)
    questions = [r["question"] for s in SPLITS for r in task.examples(s)]
    assert sorted(questions) == sorted(f"{a}+{b}" for a in range(10) for b in range(10))


def test_format_hand_checked():
    task = ArithmeticTask(n_train=1, n_validation=1, n_test=1)
    row = {"question": "12+34-5", "operands": [12, 34, 5], "operators": ["+", "-"], "answer": "41"}
    assert task.prompt(row) == "Compute: 12+34-5\n"
    assert task.reference_solution(row) == "12+34=46\n46-5=41\nAnswer: 41"

    negative = {"question": "3-10+5", "operands": [3, 10, 5], "operators": ["-", "+"], "answer": "-2"}
    assert task.reference_solution(negative) == "3-10=-7\n-7+5=-2\nAnswer: -2"

    # Left to right, not precedence: 2-9*3 is (2-9)*3 = -21, not 2-27 = -25.
    times = {"question": "2-9*3", "operands": [2, 9, 3], "operators": ["-", "*"], "answer": "-21"}
    assert task.reference_solution(times) == "2-9=-7\n-7*3=-21\nAnswer: -21"
    assert task.reward("2-9=-7\n-7*3=-21\nAnswer: -21", times) == 1.0
    assert task.reward("Answer: -25", times) == 0.0


def test_generated_solution_shape():
    task = _small(operators="+-*")
    for row in task.examples("validation"):
        solution = task.reference_solution(row)
        lines = solution.split("\n")
        assert len(lines) == len(row["operators"]) + 1
        assert lines[-1] == f"Answer: {row['answer']}"
        assert not solution.endswith("\n")
        assert task.prompt(row).endswith("\n")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("12+34=46\n46-5=41\nAnswer: 41", "41"),
        ("Answer: 41", "41"),
        ("Answer:41", "41"),
        ("Answer: +41", "41"),
        ("Answer: 041", "41"),
        ("Answer: - 7", "-7"),
        ("Answer: 41.", "41"),
        ("Answer: 3\nAnswer: 41", "41"),  # the LAST answer line counts
        ("Answer: 41\nAnswer:", None),  # ... even when it is empty
        ("12+34=46\n46-5=41", None),  # truncated: no answer line
        ("Answer: 41.5", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert ArithmeticTask(n_train=1, n_validation=1, n_test=1).extract_answer(response) == expected


def test_reward():
    task = ArithmeticTask(n_train=1, n_validation=1, n_test=1)
    row = {"question": "12+34-5", "operands": [12, 34, 5], "operators": ["+", "-"], "answer": "41"}
    assert task.reward("12+34=46\n46-5=41\nAnswer: 41", row) == 1.0
    assert task.reward("Answer: 041 ", row) == 1.0
    assert task.reward("12+34=46\n46-5=40\nAnswer: 40", row) == 0.0
    assert task.reward("12+34=46\n46-5=41", row) == 0.0  # truncated before the answer line
    assert task.reward("", row) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "knob"),
    [
        ({"digits": 0}, "digits"),
        ({"digits": 1.5}, "digits"),
        ({"operators": "/"}, "operators"),
        ({"operators": "+/"}, "operators"),
        ({"operators": ""}, "operators"),
        ({"num_operands": 1}, "num_operands"),
        ({"num_operands": (4, 3)}, "num_operands"),
        ({"num_operands": (2, 3, 4)}, "num_operands"),
        ({"n_train": -1}, "n_train"),
        ({"digits": 1, "num_operands": 2, "operators": "+"}, "n_train"),  # 100 questions < 21000
    ],
)
def test_bad_knobs(kwargs, knob):
    with pytest.raises(ValueError, match=knob):
        ArithmeticTask(**kwargs)


def test_bad_split_and_missing_field():
    task = ArithmeticTask(n_train=1, n_validation=1, n_test=1)
    with pytest.raises(ValueError, match="available splits: train, validation, test"):
        task.examples("dev")
    with pytest.raises(KeyError, match="question"):
        task.prompt({"operands": [1, 2]})
    with pytest.raises(KeyError, match="operators"):
        task.reference_solution({"question": "1+2", "operands": [1, 2]})


def test_step_correctness_labels_the_first_error_and_everything_after():
    task = _small()
    ex = {"question": "9+3-3-2", "operands": [9, 3, 3, 2], "operators": ["+", "-", "-"], "answer": 7}
    # 9+3=12, 12-3=9, 9-2=7: all correct, the answer line merged into the last step
    assert task.step_correctness(ex, ["9+3=12\n", "12-3=9\n", "9-2=7\nAnswer: 7"]) == [True, True, True]
    # the second line is wrong (12-3 is 9); the rest follows from it and stays False
    assert task.step_correctness(ex, ["9+3=12\n", "12-3=8\n", "8-2=6\nAnswer: 6"]) == [True, False, False]
    # a wrong copied operand with a right answer by accident is still an error from that line on
    assert task.step_correctness(ex, ["9+3=12\n", "12-2=10\n", "10-3=7\nAnswer: 7"]) == [True, False, False]
    # right lines but a wrong answer line; blank lines and surrounding spaces are ignored
    assert task.step_correctness(ex, [" 9+3=12 \n\n", "12-3=9\n9-2=7\n", "Answer: 8"]) == [True, True, False]
    # an extra arithmetic line past the reference's last one is an error; an answer with no number too
    assert task.step_correctness(ex, ["9+3=12\n12-3=9\n9-2=7\n", "7-0=7\n"]) == [True, False]
    assert task.step_correctness(ex, ["Answer: seven"]) == [False]
    assert task.step_correctness(ex, []) == []
