"""MATH: boxed-answer extraction, symbolic equivalence, the timeout guard, and MATH-500 itself."""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import time

import pytest

from lit_reason.tasks import MathTask, extract_boxed, get_task
from lit_reason.tasks.math import normalize_latex

ROW = {
    "problem": "What is $1/2 + 0$?",
    "solution": "We have $\\frac{1}{2} + 0 = \\boxed{\\frac{1}{2}}$.",
    "answer": "\\frac{1}{2}",
}
PATHOLOGICAL = "\\boxed{9^{9^{9^{9^{9}}}}}"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> MathTask:
    path = tmp_path_factory.mktemp("math") / "test.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    task = MathTask(path=path, timeout_s=3.0)
    yield task
    task.verifier.close()


@pytest.fixture(scope="module")
def math500(data_dir) -> MathTask:
    task = MathTask(path=data_dir / "math500")
    yield task
    task.verifier.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a^{2}}{b}}}", "\\sqrt{\\frac{a^{2}}{b}}"),
        ("first \\boxed{1}, then \\fbox{2}", "2"),  # the LAST box
        ("\\boxed{1} and \\boxed{ 3 }", "3"),
        ("so the answer is $\\boxed 5$.", "5"),
        ("\\boxed {7}.", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{1} then \\boxed{\\frac{3}{", None),  # truncated last box
        ("\\boxed{}", None),
        ("\\setlength{\\fboxsep}{3pt} 4", None),
        ("no box here: 42", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_normalize_latex():
    assert normalize_latex("\\left( 3, \\dfrac{\\pi}{2} \\right).") == "(3,\\frac{\\pi}{2})"
    assert normalize_latex("90^{\\circ}") == normalize_latex("90^\\circ") == "90"
    assert normalize_latex("\\text{(C)}") == "(C)"


def test_format(task):
    assert get_task("math", path=task.path).prompt(ROW) == f"Problem: {ROW['problem']}\nSolution:\n"
    assert task.reference_solution(ROW) == ROW["solution"]
    assert task.reference_answer(ROW) == "\\frac{1}{2}"
    no_answer = {"problem": "p", "solution": "Thus \\boxed{2} or \\boxed{\\dfrac{3}{4}}."}
    assert task.reference_answer(no_answer) == "\\dfrac{3}{4}"
    with pytest.raises(ValueError, match="answer"):
        task.reference_answer({"problem": "p", "solution": "no box"})
    with pytest.raises(KeyError, match="problem"):
        task.prompt({"solution": "s"})


def test_splits(task, tmp_path):
    assert task.examples("test") == [ROW]
    with pytest.raises(ValueError, match="available splits: test"):
        task.examples("train")
    (tmp_path / "test.jsonl").write_text(json.dumps(ROW) + "\n")
    with pytest.raises(ValueError, match="available splits: test"):
        MathTask(path=tmp_path).examples("validation")  # no derived validation for MATH
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl line 1 is missing field 'solution'"):
        MathTask(path=tmp_path).examples("train")
    with pytest.raises(ValueError, match="timeout_s"):
        MathTask(path=tmp_path, timeout_s=0)


@pytest.mark.parametrize(
    ("predicted", "gold", "same"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac12", "\\frac{1}{2}", True),
        ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("(x+1)^2", "x^2+2x+1", True),
        ("90^\\circ", "90", True),
        ("3", "4", False),
        ("[0,1)", "[0,1]", False),
        ("\\frac{1}{3}", "0.33", False),
    ],
)
def test_answers_match(task, predicted, gold, same):
    assert task.answers_match(predicted, gold) is same


def test_reward(task):
    assert task.reward("... so the sum is $\\boxed{0.5}$", ROW) == 1.0
    assert task.reward("... so the sum is $\\boxed{\\frac{1}{3}}$", ROW) == 0.0
    assert task.reward("... so the sum is 1/2", ROW) == 0.0  # no boxed answer
    assert task.reward("... so the sum is $\\boxed{\\frac{1}{", ROW) == 0.0  # truncated


def _timed_reward(task, response, example) -> tuple[float, float]:
    start = time.perf_counter()
    reward = task.reward(response, example)
    return reward, time.perf_counter() - start


def test_timeout_on_pathological_answer(task):
    gold = {"problem": "p", "solution": "\\boxed{5}", "answer": "5"}
    task.reward("\\boxed{5.0}", gold)  # start the worker: its start-up is not charged to the timeout
    reward, elapsed = _timed_reward(task, PATHOLOGICAL, gold)
    print(f"pathological answer graded {reward} in {elapsed:.2f} s (timeout_s={task.timeout_s})")
    assert reward == 0.0
    assert elapsed < task.timeout_s + 3.0

    # The same from a non-main thread, where math_verify's own SIGALRM timeouts cannot work.
    results = []
    thread = threading.Thread(target=lambda: results.append(_timed_reward(task, PATHOLOGICAL, gold)))
    thread.start()
    thread.join(timeout=task.timeout_s + 30)
    assert not thread.is_alive()
    (reward, elapsed), = results
    assert reward == 0.0 and elapsed < task.timeout_s + 3.0

    # The killed worker is replaced: grading goes on working.
    assert task.reward("\\boxed{5.0}", gold) == 1.0
    assert task.reward("\\boxed{6}", gold) == 0.0


def test_pickled_task_grades_with_its_own_worker(task):
    copy = pickle.loads(pickle.dumps(task))
    try:
        assert copy.verifier is not task.verifier
        assert copy.reward("\\boxed{0.5}", ROW) == 1.0
        assert copy.reward("\\boxed{0.25}", ROW) == 0.0
    finally:
        copy.verifier.close()


# --- real data: MATH-500 ------------------------------------------------------------------------


def test_math500_own_solutions_earn_reward(math500):
    rows = math500.examples("test")
    assert len(rows) == 500
    failures = [i for i, row in enumerate(rows) if math500.reward(row["solution"], row) != 1.0]
    assert failures == []
    # Most pass on the string fast path; check that math_verify itself agrees on every row too.
    boxed = [extract_boxed(row["solution"]) for row in rows]
    disagree = [i for i, row in enumerate(rows) if math500.verifier.check(row["answer"], boxed[i]) is not True]
    assert disagree == []


def _strip_assignment(answer: str) -> str:
    # "x=5" and "5" state the same answer; such neighbours are not a "different answer".
    return re.sub(r"^[a-zA-Z]\s*=\s*", "", normalize_latex(answer))


def test_math500_other_rows_solutions_earn_nothing(math500):
    rows = math500.examples("test")
    pairs = 0
    wrongly_credited = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        if _strip_assignment(other["answer"]) == _strip_assignment(row["answer"]):
            continue
        pairs += 1
        if math500.reward(other["solution"], row) != 0.0:
            wrongly_credited.append((i, row["answer"], other["answer"]))
    assert pairs >= 490
    assert wrongly_credited == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_copy_uses_its_own_worker(task):
    # As in forked DataLoader workers: the child must neither share nor stop the parent's worker.
    assert task.reward("\\boxed{0.5}", ROW) == 1.0  # the parent's worker is running
    parent_worker = task.verifier._proc
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        ok = False
        try:
            ok = task.reward("\\boxed{0.5}", ROW) == 1.0 and task.reward("\\boxed{2}", ROW) == 0.0
            ok = ok and task.verifier._proc is not parent_worker
            task.verifier.close()
        finally:
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    assert task.verifier._proc is parent_worker and parent_worker.poll() is None
    assert task.reward("\\boxed{0.5}", ROW) == 1.0
