"""Smoke test of benchmarks/vs_trl.py: both frameworks, GRPO and DPO, a few optimiser steps.

TRL is in the test extra (it installs beside the core dependencies without changing their
versions), so the test requires it there; it skips, saying why, only where a checkout's test extra
does not list TRL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def trl_in_test_extra() -> bool:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return any(dep.replace(" ", "").startswith("trl") for dep in extras.get("dev", []))


@pytest.mark.slow
def test_vs_trl_runs_both_frameworks_on_the_same_work(tmp_path, embedded_arithmetic):
    if not trl_in_test_extra():
        pytest.skip("TRL is not in the test extra (pyproject [dev]); the benchmark needs `pip install trl==1.16.*`")
    try:
        import trl  # noqa: F401
    except ImportError:
        pytest.fail('TRL is in the test extra but not installed: pip install -e ".[dev]"')
    cmd = [sys.executable, "benchmarks/vs_trl.py", "--seeds", "0", "--steps", "4", "--eval-limit", "4",
           "--threads", "1", "--grpo", "prompts_per_iteration=2", "minibatch_size=4", "--dpo", "batch_size=4",
           "--data", str(tmp_path / "data"), "--collect", "{samples: 4, limit: 8, temperature: 0.7}",
           "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    runs = {(r["method"], r["framework"]): r for r in results["runs"]}
    assert set(runs) == {(m, f) for m in ("grpo", "dpo") for f in ("lit_reason", "trl")}
    for (method, framework), r in runs.items():
        assert r["steps"] == 4, (method, framework, r)  # the same number of optimiser steps on both sides
        assert 0 < r["loop_seconds"] <= r["train_seconds"] and r["peak_rss_mb"] > 100
        assert 0.0 <= r["end_accuracy"] <= 1.0
        if method == "grpo":
            # one iteration (2 epochs x 2 minibatches of 4): one rollout of 2 prompts x 4 samples (the
            # recipe's group size), up to 96 tokens each
            assert 8 <= r["generated_tokens"] <= 8 * 96
            assert 0 < r["generation_seconds"] <= r["rollout_seconds"] <= r["loop_seconds"]
    # the same pairs on both sides: 8 prompts' (correct, wrong) pairs as token ids
    pairs = json.loads((tmp_path / "work" / "dpo_pairs.json").read_text())
    assert pairs and all(p["chosen_ids"] != p["rejected_ids"] for p in pairs)
    assert re.search(r"^\| grpo \| \d+\.\d\d \|", proc.stdout, re.M), proc.stdout  # the ours/TRL ratio row
    assert re.search(r"^\| dpo \| \d+\.\d\d \|", proc.stdout, re.M), proc.stdout


def load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vs_trl_rejects_settings_it_cannot_apply_to_both_sides():
    bench = load_benchmark()
    with pytest.raises(SystemExit, match="KEY one of"):
        bench.parse_overrides("grpo", ["clip_eps=0.3"])  # not a setting both sides read
    assert bench.parse_overrides("dpo", ["batch_size=4", "lr=1e-6"]) == {"batch_size": 4, "lr": 1e-6}
    # 32 prompts x 4 samples / minibatch 64 x 2 epochs = 4 optimiser steps per iteration
    with pytest.raises(SystemExit, match="multiple of 4"):
        bench.main(["--methods", "grpo", "--steps", "6"])


@pytest.mark.slow
def test_vs_trl_on_the_smollm2_recipes_uses_lora_and_chat_prompts_on_both_sides(tmp_path):
    """``--recipes recipes/smollm2``: the real SmolLM2-135M-Instruct, LoRA and chat prompts on both
    sides, one GRPO iteration of 1 prompt x 4 samples; the folder has no DPO recipe, which is refused."""
    from test_smollm2 import gguf_file_or_skip

    gguf_file_or_skip()
    if not trl_in_test_extra():
        pytest.skip("TRL is not in the test extra (pyproject [dev]); the benchmark needs `pip install trl==1.16.*`")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    refused = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--recipes", "recipes/smollm2", "--methods",
                              "dpo"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "has no recipe for dpo" in refused.stderr, refused.stderr[-2000:]
    cmd = [sys.executable, "benchmarks/vs_trl.py", "--recipes", "recipes/smollm2", "--methods", "grpo",
           "--seeds", "0", "--steps", "1", "--eval-limit", "1", "--threads", "1",
           "--grpo", "prompts_per_iteration=1", "minibatch_size=4", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["framework"]: r for r in json.loads((tmp_path / "work" / "results.json").read_text())["runs"]}
    assert set(runs) == {"lit_reason", "trl"}
    for r in runs.values():
        assert r["steps"] == 1
        # 4 samples of at most the recipe's 40 new tokens; a 135M-parameter model's RSS
        assert 4 <= r["generated_tokens"] <= 4 * 40 and r["peak_rss_mb"] > 500
