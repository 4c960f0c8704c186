"""GSM8K: jsonl loading, data-folder resolution, answer extraction, and the grader on real labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_reason.paths import default_data_dir
from lit_reason.tasks import GSM8KTask, MissingFieldError, get_task, read_jsonl

ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def task(tmp_path) -> GSM8KTask:
    return GSM8KTask(path=_write_jsonl(tmp_path / "one.jsonl", [ROW]))


# --- jsonl -------------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n   \n" + json.dumps({**ROW, "question": "q2"}) + "\n")
    rows = read_jsonl(path)
    assert [r["question"] for r in rows] == [ROW["question"], "q2"]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n{not json}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: malformed JSON"):
        read_jsonl(path)
    path.write_text(json.dumps(ROW) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: expected a JSON object"):
        read_jsonl(path)


def test_read_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "gap.jsonl", [ROW, ROW, {"question": "no answer here"}])
    with pytest.raises(MissingFieldError, match=r"gap\.jsonl line 3 is missing field 'answer'") as info:
        read_jsonl(path)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert read_jsonl(path, required=("question",))[2] == {"question": "no answer here"}
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


# --- paths and split resolution ----------------------------------------------------------------


def test_default_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_REASON_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("LIT_REASON_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LIT_REASON_DATA"):
        default_data_dir()


def test_default_data_dir_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("LIT_REASON_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert default_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_folder_splits_hold_out_validation(tmp_path):
    train = [{"question": f"train {i}", "answer": f"#### {i}"} for i in range(250)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", [ROW])
    task = GSM8KTask(path=tmp_path)
    assert task.examples("train") == train[:50]
    assert task.examples("validation") == train[-200:]
    assert task.examples("test") == [ROW]


def test_single_file_is_test_only(task):
    assert task.examples("test") == [ROW]
    with pytest.raises(ValueError, match="available splits: test"):
        task.examples("train")
    with pytest.raises(ValueError, match="available splits"):
        task.examples("dev")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        GSM8KTask(path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        GSM8KTask(path=tmp_path).examples("test")  # an empty folder
    _write_jsonl(tmp_path / "test.jsonl", [ROW, {"answer": "#### 1"}])
    with pytest.raises(ValueError, match=r"test\.jsonl line 2 is missing field 'question'"):
        GSM8KTask(path=tmp_path).examples("test")
    with pytest.raises(ValueError, match="either path= or dataset="):
        GSM8KTask(path=tmp_path, dataset="openai/gsm8k")


def test_hub_fallback_error_explains_what_to_do(tmp_path):
    # A fresh interpreter, so that the Hub's offline switch is read at import (and no retries).
    env = {**os.environ, "LIT_REASON_DATA": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "from lit_reason.tasks import GSM8KTask\nt = GSM8KTask()\nprint(t.dataset)\nt.examples('test')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout.strip() == "openai/gsm8k"
    assert "RuntimeError" in result.stderr
    assert "path=" in result.stderr and "LIT_REASON_DATA" in result.stderr


# --- format and grading ------------------------------------------------------------------------


def test_prompt_and_reference(task):
    assert task.prompt(ROW) == f"Question: {ROW['question']}\nAnswer:\n"
    assert task.reference_solution(ROW) == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert task.reference_answer(ROW) == "72"
    assert task.reference_answer({"question": "q", "answer": "#### 1,000"}) == "1000"
    assert task.answer_prefix == "####"
    with pytest.raises(KeyError, match="question"):
        task.prompt({"answer": "#### 1"})
    with pytest.raises(ValueError, match="####"):
        task.reference_answer({"question": "q", "answer": "72"})


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 72\nA: 5", "72"),  # "####" wins over "A:"
        ("so 24 + 48 = 72\nA: 72", "72"),
        ("The answer is 72 clips.", "72"),
        ("Final answer: 3.5 hours", "3.5"),
        ("The answer is $1,000.00.", "1000"),
        ("It rose by 50%.", "50"),
        ("A: -5", "-5"),
        ("She loses -$5 in total", "-5"),
        ("In 2019-2020 she sold 48 + 24 = 72 clips.", "72"),  # no cue: the last number
        ("each gets 3/4 of a pie", "0.75"),
        ("one third: 1/3", "1/3"),
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_answer(task, response, expected):
    assert task.extract_answer(response) == expected


def test_answers_match(task):
    assert task.answers_match("1000", "1000.00")
    assert task.answers_match("0.333333", "1/3")  # 3.3e-7 apart: within the 1e-6 tolerance
    assert not task.answers_match("0.33333", "1/3")  # 3.3e-6 apart
    assert task.answers_match("-5", "-5.0")
    assert not task.answers_match("72", "73")
    assert not task.answers_match("72", "-72")


def test_reward(task):
    assert task.reward("48/2 = 24\n24 + 48 = 72\n#### 72", ROW) == 1.0
    assert task.reward("The answer is $72.", ROW) == 1.0
    assert task.reward("#### 71", ROW) == 0.0
    assert task.reward("I give up", ROW) == 0.0
    assert task.reward(ROW["answer"], ROW) == 1.0


# --- real data ---------------------------------------------------------------------------------


def test_real_splits(data_dir, monkeypatch):
    monkeypatch.setenv("LIT_REASON_DATA", str(data_dir))
    task = get_task("gsm8k")
    assert task.path == (data_dir / "gsm8k").resolve()
    sizes = {s: len(task.examples(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 7273, "validation": 200, "test": 1319}
    train_questions = {r["question"] for r in task.examples("train")}
    assert not train_questions & {r["question"] for r in task.examples("validation")}


def test_gold_answers_earn_reward(data_dir):
    task = GSM8KTask(path=data_dir / "gsm8k")
    rows = task.examples("test")
    assert all(task.reward(row["answer"], row) == 1.0 for row in rows)
    for row in rows:
        solution = task.reference_solution(row)
        assert "<<" not in solution and not solution.endswith("\n")
        assert solution.split("\n")[-1].startswith("#### ")
        assert task.reward(solution, row) == 1.0


def test_grader_agrees_with_labelled_model_solutions(data_dir):
    task = GSM8KTask(path=data_dir / "gsm8k")
    tests = task.examples("test")
    labelled = read_jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl", required=("question", "ground_truth"))
    assert len(labelled) == len(tests) == 1319
    agree = total = 0
    for index, (row, gold) in enumerate(zip(labelled, tests)):
        # The rows carry the question: alignment with test.jsonl is by index, checked here.
        assert row["question"] == gold["question"], f"row {index} is not aligned with test.jsonl"
        assert task.reward(row["ground_truth"], gold) == 1.0
        for key, value in row.items():
            if isinstance(value, dict) and "is_correct" in value:
                total += 1
                agree += (task.reward(value["solution"], gold) == 1.0) == value["is_correct"]
    print(f"GSM8K grader agreement with is_correct labels: {agree}/{total} = {agree / total:.4%}")
    assert total == 5276
    assert agree / total >= 0.995
