"""Tests of policy-name resolution: embedded names, save_pretrained folders, broken folders, hub names."""

from __future__ import annotations

import time

import pytest
import torch

from lit_reason.models.loading import EMBEDDED_NAMES, load_policy, resolve_dtype

pytestmark = pytest.mark.usefixtures("single_torch_thread")


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("policy")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_embedded_tiny(tiny_tokenizer):
    model, tok = load_policy("embedded:tiny", tiny_kwargs=TINY)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.vocab_size == len(tok) == len(tiny_tokenizer)
    assert tok.eos_token_id == tiny_tokenizer.eos_token_id and tok.pad_token_id is not None
    logits = model(input_ids=torch.tensor([tok("1+2", add_special_tokens=False)["input_ids"]])).logits
    assert logits.shape[-1] == len(tok)
    model16, _ = load_policy("embedded:tiny", dtype="bf16", tiny_kwargs=TINY)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_unknown_embedded_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_policy("embedded:nosuch")
    assert "embedded:nosuch" in str(err.value)
    for name in EMBEDDED_NAMES:
        assert name in str(err.value)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8")


def test_saved_folder_round_trip(saved_dir, tiny_model, tiny_tokenizer):
    model, tok = load_policy(str(saved_dir))
    ids = torch.tensor([tiny_tokenizer("Compute: 1+2\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-5)
    assert tok("12+3")["input_ids"] == tiny_tokenizer("12+3")["input_ids"]
    assert tok.padding_side == "left" and tok.pad_token_id == tiny_tokenizer.pad_token_id


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "policy"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_policy(str(missing))


def test_folder_without_config(tmp_path, saved_dir):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(str(folder))


def test_folder_without_weights(tmp_path, saved_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((saved_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weight files"):
        load_policy(str(folder))


@pytest.mark.parametrize("keep", [0.5, 0.999, 4 / 1e9])
def test_truncated_safetensors_is_named(tmp_path, saved_dir, keep):
    folder = tmp_path / "truncated"
    folder.mkdir()
    for f in saved_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match=str(weights)):
        load_policy(str(folder))


def test_corrupt_config_json(tmp_path, saved_dir):
    folder = tmp_path / "badconfig"
    folder.mkdir()
    for f in saved_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json"):
        load_policy(str(folder))


def test_offline_hub_name_fails_fast(monkeypatch):
    # set after huggingface_hub was imported (it reads the variable once, at import): load_policy
    # must still honour it instead of retrying the network for a minute
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ValueError, match="nosuch-org/nosuch-model"):
        load_policy("nosuch-org/nosuch-model")
    assert time.monotonic() - start < 10, "an offline hub lookup must not retry the network"
