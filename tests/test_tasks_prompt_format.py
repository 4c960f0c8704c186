"""Prompt formats (plain / chat through a tokenizer's chat template) and the answer forms instruct models
write, graded by every task. The ``REAL_*`` responses are verbatim greedy outputs of
SmolLM2-135M-Instruct (``smollm2:135m-instruct``) with chat prompts."""

from __future__ import annotations

import copy

import pytest

from lit_reason.tasks import ArithmeticTask, GSM8KTask, MathTask, get_task
from lit_reason.tasks.prompt_format import PromptFormat, end_of_turn_token, resolve_prompt_format

# a template in the shape of ChatML, without special tokens of its own (the tiny tokenizer has none)
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def small_task(**kw) -> ArithmeticTask:
    return ArithmeticTask(num_operands=3, n_train=4, n_validation=4, n_test=4, **kw)


def test_plain_is_the_default_and_unchanged():
    task = small_task()
    row = task.examples("test")[0]
    assert task.prompt_format == PromptFormat()
    assert task.prompt(row) == f"Compute: {row['question']}\n" == task.plain_prompt(row)
    assert "prompt_format" not in repr(task)  # cache keys built from repr() stay as they were


def test_chat_prompt_is_one_shot_through_the_template(chat_tokenizer):
    task = small_task(prompt_format="chat").use_tokenizer(chat_tokenizer)
    row = task.examples("test")[0]
    instr = task.chat_instruction
    assert task.prompt(row) == (
        f"<user>{instr}\n\nCompute: 2+5-3</turn>\n<assistant>2+5=7\n7-3=4\nAnswer: 4</turn>\n"
        f"<user>{instr}\n\nCompute: {row['question']}</turn>\n<assistant>"
    )
    assert "prompt_format={'kind': 'chat'" in repr(task)


def test_chat_prompt_options(chat_tokenizer):
    fmt = {"kind": "chat", "system": "Be brief.", "instruction": "Add it up.", "one_shot": False}
    task = small_task(prompt_format=fmt).use_tokenizer(chat_tokenizer)
    row = task.examples("test")[0]
    assert task.prompt(row) == f"<system>Be brief.</turn>\n<user>Add it up.\n\nCompute: {row['question']}</turn>\n<assistant>"
    bare = small_task(prompt_format={"kind": "chat", "instruction": None, "one_shot": False}).use_tokenizer(chat_tokenizer)
    assert bare.prompt(row) == f"<user>Compute: {row['question']}</turn>\n<assistant>"


def test_dataset_tasks_put_the_bare_question_in_the_user_turn(chat_tokenizer, tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "What is 2+2?", "answer": "2+2=4\\n#### 4"}\n')
    gsm = GSM8KTask(path=tmp_path, prompt_format={"kind": "chat", "instruction": ""}).use_tokenizer(chat_tokenizer)
    assert gsm.prompt(gsm.examples("test")[0]) == "<user>What is 2+2?</turn>\n<assistant>"
    (tmp_path / "m.jsonl").write_text('{"problem": "Find $x$.", "solution": "\\\\boxed{3}"}\n')
    math = MathTask(path=tmp_path / "m.jsonl", prompt_format="chat").use_tokenizer(chat_tokenizer)
    assert math.prompt(math.examples("test")[0]).endswith("\\boxed{}.\n\nFind $x$.</turn>\n<assistant>")


def test_end_of_turn_token_is_read_from_the_template(chat_tokenizer, tiny_tokenizer):
    # no special token closes a turn in TEMPLATE: EOS is left alone
    assert end_of_turn_token(chat_tokenizer) is None
    eos = tiny_tokenizer.eos_token
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE.replace("</turn>", eos)
    assert end_of_turn_token(tok) == eos


def test_resolve_prompt_format_accepts_names_dicts_and_instances():
    assert resolve_prompt_format(None) == resolve_prompt_format("plain") == PromptFormat()
    chat = resolve_prompt_format({"kind": "chat", "system": "s"})
    assert (chat.kind, chat.system, chat.instruction, chat.one_shot) == ("chat", "s", "default", True)
    assert resolve_prompt_format(chat) is chat


# --- answer forms -----------------------------------------------------------------------------

FORMS = ["Answer: 12", "So, the answer is 12.", "The answer is: 12", "#### 12", "\\boxed{12}",
         "The final answer is $\\boxed{12}$.", "**Answer:** 12", "the answer is **12**."]


@pytest.mark.parametrize("form", FORMS)
def test_every_task_reads_the_answer_forms_models_write(form):
    text = f"3+4=7\n7+5=12\n{form}"
    assert small_task().extract_answer(text) == "12"
    assert GSM8KTask(dataset="unused").extract_answer(text) == "12"
    assert MathTask(dataset="unused").extract_answer(text) == "12"


def test_the_last_cue_wins_and_an_empty_last_cue_is_no_answer():
    task = small_task()
    assert task.extract_answer("Answer: 3\nSo, the answer is 5.") == "5"
    assert task.extract_answer("the answer is 5\nAnswer: ") is None
    assert MathTask(dataset="unused").extract_answer("The answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert MathTask(dataset="unused").extract_answer("\\boxed{3") is None  # a truncated box decides


# verbatim greedy responses of SmolLM2-135M-Instruct to chat prompts (arithmetic: the default one-shot
# prompt; "plain-instruction": one_shot false with the instruction left out)
REAL_ARITHMETIC = [
    ("3+6+9", "18", "3+6=9\n9+9=18\nAnswer: 8", "8", False),
    ("5-4+0", "1", "5-4=1\n1+0=1\nAnswer: 1", "1", True),
    ("9-8-0", "1", "9-8=1\n1-0=1\nAnswer: 1", "1", True),
    # one_shot false, instruction "Compute step by step, one step per line."
    ("5-4+0", "1", "1. 5 - 4 = 1\n2. 5 + 0 = 5\n\nSo, the answer is 5.", "5", False),
    ("7-5+6", "8", "To compute 7-5+6, we need to add 7 and 5, then add 6.\n\nThe steps to add 7 and 5 are:\n"
                   "7 + 5 = 12\n12 - 1 = 12\n\nSo, the answer is:", None, False),
    ("9+8-2", "15", "To compute the sum of 9 + 8 - 2, we need to add 9 and 8, then subtract 2, which is 11.\n\n"
                    "The result is 11.", None, False),
    ("2+3-3", "2", "2 + 3 - 3 = 5", None, False),
]


@pytest.mark.parametrize(("question", "gold", "response", "answer", "correct"), REAL_ARITHMETIC)
def test_real_smollm2_arithmetic_responses(question, gold, response, answer, correct):
    task = small_task()
    row = {"question": question, "answer": gold}
    assert task.extract_answer(response) == answer
    assert task.reward(response, row) == float(correct)


# the endings (last lines) of verbatim greedy responses of SmolLM2-135M-Instruct to the first GSM8K test
# problems with the default chat prompt (`evaluate --task gsm8k --prompt-format chat --limit 20`)
REAL_GSM8K = [
    ('She makes a total of 1440 + 16 x 3 = 1440 + 16 x 4 = 1440 + 16 x 4 = 1440 + 16 = 2080 dollars per day.\n#### 2080\nThe answer is: 2080',
     '18', '2080', False),
    ('1. 2 bolts of blue fiber = 2 * 2 = 4 bolts\n2. 1 block of white fiber = 1 * 2 = 2 bolts\n3. 1 block of blue fiber = 1 * 2 = 2 bolts\n\nThe answer is 3.',
     '3', '3', True),
    ('\nThe total increase in value of the house is 220,000 - 160,000 = 120,000.\n\nThe answer is 120,000.',
     '70000', '120000', False),
    ('4. Finally, we multiply 270 by 3, which gives us 740.\n5. So, James runs 740 meters per week.\n\nThe answer is 740.',
     '540', '740', False),
    ('3. So, 40 * 10 = 400.\n4. Now, we can add the total earnings to the total hours worked.\n5. 400 + 400 = 800.\n\nSo, the answer is 800.',
     '460', '800', False),
    ('\nShe sold 10 * 2 = 20 items.\n\nSo, Melanie started with 20 - 10 = 10 items.\n\nThe answer is 10.',
     '18', '10', False),
    ('\nThe percentage of students who enrolled in jazz dance is 25%.\n\nSo, the answer is 25%.',
     '60', '25', False),
    ('\nThe answer is 200 miles.',
     '230', '200', False),
]


@pytest.mark.parametrize(("response", "gold", "answer", "correct"), REAL_GSM8K)
def test_real_smollm2_gsm8k_responses(response, gold, answer, correct):
    task = GSM8KTask(dataset="unused")
    assert task.extract_answer(response) == answer
    assert task.reward(response, {"question": "q", "answer": f"#### {gold}"}) == float(correct)
