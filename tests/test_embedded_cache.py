"""Tests of the build-once cache behind ``embedded:arithmetic`` (atomic rename, file lock, failures).

The real SFT recipe takes minutes, so the recipe table is pointed at a 2-step recipe of a
32-wide model written here; the build itself (a ``python -m lit_reason fit`` subprocess with an
export fragment) runs for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_reason.models import embedded

pytestmark = pytest.mark.slow

TINY_RECIPE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
model:
  class_path: lit_reason.methods.SFT
  init_args:
    policy: embedded:tiny
    task: {name: arithmetic, n_train: 64, n_validation: 8, n_test: 8}
    batch_size: 16
    warmup_steps: 1
    tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}
"""

# what a user process does on first use of embedded:arithmetic, with the recipe table redirected
ENSURE_SCRIPT = """\
import sys
from pathlib import Path
import lit_reason.models.embedded as embedded
recipe = Path(sys.argv[1])
embedded.RECIPES = {"arithmetic": recipe.name}
embedded.recipes_dir = lambda: recipe.parent
print("RESULT", embedded.ensure_embedded("arithmetic"))
"""


def point_at(monkeypatch, recipe: Path, cache: Path) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(cache))
    monkeypatch.setattr(embedded, "RECIPES", {"arithmetic": recipe.name})
    monkeypatch.setattr(embedded, "recipes_dir", lambda: recipe.parent)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".build-" in p.name)


def test_concurrent_first_uses_build_once(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "tiny-sft.yaml"
    recipe.write_text(TINY_RECIPE)
    cache = tmp_path / "cache"
    script = tmp_path / "ensure.py"
    script.write_text(ENSURE_SCRIPT)
    env = dict(os.environ, LIT_REASON_CACHE=str(cache), WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(recipe)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    target = cache / f"embedded-arithmetic-{embedded.EMBEDDED_VERSION}"
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert f"RESULT {target}" in out
    # the lock made the second process wait for the first one's model instead of training its own
    assert sum(err.count("building embedded:arithmetic") for _, err in outputs) == 1
    assert leftovers(cache) == []
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(target)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1  # the test's recipe
    assert tok.eos_token == "</s>" and model.config.vocab_size == len(tok)

    # a later use finds the folder and never starts a build
    point_at(monkeypatch, recipe, cache)

    def no_build(*args, **kwargs):
        raise AssertionError("ensure_embedded rebuilt a cached policy")

    monkeypatch.setattr(embedded.subprocess, "run", no_build)
    start = time.monotonic()
    assert embedded.ensure_embedded("arithmetic") == target
    assert time.monotonic() - start < 1.0
    from lit_reason.models.loading import load_policy

    policy, _ = load_policy("embedded:arithmetic")
    assert policy.config.hidden_size == 32


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "broken.yaml"
    recipe.parent.mkdir()
    recipe.write_text(TINY_RECIPE.replace("batch_size: 16", "batch_size: 16\n    no_such_option: 1"))
    cache = tmp_path / "cache"
    point_at(monkeypatch, recipe, cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the build subprocess
    with pytest.raises(RuntimeError) as err:
        embedded.ensure_embedded("arithmetic")
    message = str(err.value)
    assert "embedded:arithmetic" in message and "lit_reason fit" in message and str(recipe) in message
    assert not embedded.embedded_path("arithmetic").exists()
    assert leftovers(cache) == []


def test_unknown_name_and_missing_recipe(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    point_at(monkeypatch, tmp_path / "recipes" / "missing.yaml", cache)
    with pytest.raises(ValueError, match="embedded:arithmetic"):
        embedded.ensure_embedded("nosuch")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        embedded.ensure_embedded("arithmetic")
    assert leftovers(cache) == []
    assert not embedded.embedded_path("arithmetic").exists()


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "c"))
    assert embedded.embedded_path("arithmetic") == tmp_path / "c" / f"embedded-arithmetic-{embedded.EMBEDDED_VERSION}"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_dir() == Path.home() / ".cache" / "lit_reason"
