"""Shared fixtures: where the real data lives, and the tiny model/tokenizer built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """Returns the real-data folder: ``$LIT_REASON_DATA`` or ``../shared/data`` beside the repo."""
    env = os.environ.get("LIT_REASON_DATA")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real GSM8K/MATH-500 folder; skips with a reason where absent, but never when CI=true."""
    found = shared_data_dir()
    if found is None:
        reason = (
            "real data not found: set LIT_REASON_DATA to the folder holding gsm8k/ and math500/ "
            "(default ../shared/data beside the repository)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- CI=true, so this is an error, not a skip")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a test module: the tiny model's ops are too small to split, and on
    busy shared cores two spinning threads make such tests several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lit_reason.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    from lit_reason.models.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as a policy folder (what a user passes as ``policy: PATH``)."""
    path = tmp_path_factory.mktemp("tiny_policy")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def embedded_arithmetic():
    """The real ``embedded:arithmetic`` folder, built by the SFT recipe on first use (minutes, once)."""
    from lit_reason.models.embedded import ensure_embedded

    return ensure_embedded("arithmetic")


def one_step_config(method: str) -> str:
    """A one-step CPU ``fit`` config of ``lit_reason.methods.<method>`` on ``embedded:arithmetic``
    (for the checks that fail before any model is built)."""
    return ("trainer: {accelerator: cpu, devices: 1, max_steps: 1, logger: false, enable_checkpointing: false}\n"
            f"model:\n  class_path: lit_reason.methods.{method}\n"
            "  init_args: {policy: embedded:arithmetic, task: arithmetic}\n")


@pytest.fixture
def built_modules(monkeypatch):
    """Names of every ``nn.Module`` constructed during the test (the LightningModule included), with
    the in-process CLI set up to run: a config error must fail before this list gets an entry."""
    import logging
    import sys

    import torch

    built: list[str] = []
    init = torch.nn.Module.__init__

    def record(self, *a, **kw):
        built.append(type(self).__name__)
        init(self, *a, **kw)

    monkeypatch.setattr(torch.nn.Module, "__init__", record)
    monkeypatch.setattr(sys, "argv", ["lit_reason"])  # LightningCLI reads sys.argv when args are given too
    # in-process, Lightning's log handler may still hold an earlier test's closed capture stream
    monkeypatch.setattr(logging, "raiseExceptions", False)
    return built
