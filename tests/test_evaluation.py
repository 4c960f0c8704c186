"""Tests of policy evaluation: greedy accuracy, sampled pass@1 and majority vote."""

from __future__ import annotations

import pytest
import torch

from lit_reason.evaluation import evaluate_policy, format_table, majority_answer
from lit_reason.tasks import get_task


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", n_train=50, n_validation=10, n_test=10)


class Script:
    """Forward hook (with kwargs) on the model that makes it emit a fixed token sequence.

    The step counter restarts at every prefill (a forward pass over more than one input position;
    the model, not ``lm_head``, is hooked because the prefill computes the last position's logits
    only), so every row of every ``sample`` call gets ``tokens`` and then keeps emitting the last one.
    """

    def __init__(self, tokens):
        self.tokens, self.step = tokens, 0

    def __call__(self, module, args, kwargs, output):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.step = 0 if ids.shape[1] > 1 else self.step + 1
        output.logits[:, -1, self.tokens[min(self.step, len(self.tokens) - 1)]] = 1e4
        return output


def test_majority_answer():
    assert majority_answer(["3", "4", "4"]) == "4"
    assert majority_answer(["5", "3", "3", "5"]) == "5"  # tie: the earliest sample's answer
    assert majority_answer(["3", "5", "5", "3"]) == "3"
    assert majority_answer([None, None, "7", None, "8", "8"]) == "8"  # None never wins
    assert majority_answer([None, "7"]) == "7"
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_evaluate_policy_records_agree_with_task_reward(tiny_model, tiny_tokenizer, task):
    examples = task.examples("test")[:3]
    result = evaluate_policy(tiny_model, tiny_tokenizer, task, examples, max_new_tokens=8)
    assert set(result) == {"accuracy", "n", "records"}
    assert result["n"] == 3 and len(result["records"]) == 3
    for rec, e in zip(result["records"], examples):
        assert rec["prompt"] == task.prompt(e)
        assert rec["reference"] == e["answer"]
        assert rec["finish"] in ("eos", "stop", "length")
        assert rec["answer"] == task.extract_answer(rec["response"])
        assert rec["correct"] == (rec["finish"] != "length" and task.reward(rec["response"], e) == 1.0)
    assert result["accuracy"] == sum(r["correct"] for r in result["records"]) / 3
    with pytest.raises(ValueError, match="no examples"):
        evaluate_policy(tiny_model, tiny_tokenizer, task, [])


def test_evaluate_policy_with_samples(tiny_model, tiny_tokenizer, task):
    examples = task.examples("test")[:2]
    result = evaluate_policy(tiny_model, tiny_tokenizer, task, examples, samples=3, temperature=0.7, max_new_tokens=8)
    assert {"accuracy", "n", "records", "pass@1_mean", "majority", "samples", "temperature"} <= set(result)
    assert result["samples"] == 3 and result["temperature"] == 0.7
    for rec, e in zip(result["records"], examples):
        assert len(rec["samples"]) == len(rec["samples_correct"]) == 3
        assert all(isinstance(c, bool) for c in rec["samples_correct"])
        # a sample counts as correct only if its text earns the reward
        assert all(task.reward(t, e) == 1.0 for t, c in zip(rec["samples"], rec["samples_correct"]) if c)
        assert rec["majority_answer"] is None or rec["majority_answer"] in map(task.extract_answer, rec["samples"])
    records = result["records"]
    assert result["pass@1_mean"] == pytest.approx(sum(sum(r["samples_correct"]) / 3 for r in records) / 2)
    assert result["majority"] == sum(r["majority_correct"] for r in records) / 2
    table = format_table(result, "tiny on arithmetic")
    assert "tiny on arithmetic" in table and "greedy pass@1" in table and "majority vote (K=3)" in table


def test_hand_checked_accuracy(tiny_model, tiny_tokenizer, task):
    """The model is steered to write example 0's gold solution for every prompt.

    So example 0 is right and example 1 (a different answer) wrong: accuracy 1/2 exactly, for the
    greedy response and for every sample.
    """
    examples = task.examples("test")[:2]
    assert examples[0]["answer"] != examples[1]["answer"]
    solution = task.reference_solution(examples[0])
    tokens = tiny_tokenizer(solution, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    hook = tiny_model.register_forward_hook(Script(tokens), with_kwargs=True)
    try:
        result = evaluate_policy(tiny_model, tiny_tokenizer, task, examples, samples=3, max_new_tokens=len(tokens) + 2)
    finally:
        hook.remove()
    r0, r1 = result["records"]
    assert r0["response"] == r1["response"] == solution
    assert r0["finish"] == r1["finish"] == "eos"
    assert r0["answer"] == r1["answer"] == examples[0]["answer"]
    assert (r0["correct"], r1["correct"]) == (True, False)
    assert result["accuracy"] == 0.5
    assert r0["samples"] == r1["samples"] == [solution] * 3
    assert r0["samples_correct"] == [True] * 3 and r1["samples_correct"] == [False] * 3
    assert (r0["majority_answer"], r0["majority_correct"]) == (examples[0]["answer"], True)
    assert (r1["majority_answer"], r1["majority_correct"]) == (examples[0]["answer"], False)
    assert result["pass@1_mean"] == 0.5 and result["majority"] == 0.5


def test_truncated_correct_text_counts_as_wrong(tiny_model, tiny_tokenizer, task):
    example = task.examples("test")[0]
    solution = task.reference_solution(example)
    tokens = tiny_tokenizer(solution, add_special_tokens=False)["input_ids"]
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    hook = tiny_model.register_forward_hook(Script(tokens + newline), with_kwargs=True)
    try:
        # the whole solution fits, but no EOS follows before the limit
        result = evaluate_policy(tiny_model, tiny_tokenizer, task, [example], max_new_tokens=len(tokens) + 1)
    finally:
        hook.remove()
    rec = result["records"][0]
    assert rec["response"] == solution + "\n" and rec["finish"] == "length"
    assert rec["answer"] == example["answer"] and rec["correct"] is False
    assert result["accuracy"] == 0.0
