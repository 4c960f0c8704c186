"""Sweep configs run the same CLI: every swept key must be a valid override of the named recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_shape(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"][:4] == ["python", "-m", "lit_reason", "fit"]
    assert sweep["command"][-1] == "${args}"
    assert sweep["metric"]["name"] == "eval/accuracy"
    recipe = sweep["command"][sweep["command"].index("--config") + 1]
    assert (REPO / recipe).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_valid_overrides(path):
    sweep = yaml.safe_load(path.read_text())
    # what the W&B agent would pass: --key=value with the first value of each parameter
    args = [f"--{k}={spec['values'][0]}" for k, spec in sweep["parameters"].items()]
    cmd = [sys.executable, *sweep["command"][1:-1], *args, "--print_config"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = yaml.safe_load(proc.stdout)
    for key, spec in sweep["parameters"].items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert float(node) == float(spec["values"][0]), key
