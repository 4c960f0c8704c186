"""A non-editable install works on its own: recipes ship in the package, no clone or cwd needed.

A wheel of the sources is installed (no editable link) into a fresh venv that reuses this interpreter's
site-packages for torch and friends (``--system-site-packages``, ``--no-deps``), then the
installed command runs from a folder outside the clone with the already built
``embedded:arithmetic`` cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

PROBE = """\
import lit_reason, lit_reason.models.embedded as e
print("FILE", lit_reason.__file__)
print("RECIPES", e.recipes_dir())
print("SFT", (e.recipes_dir() / "sft.yaml").is_file())
print("FRAGMENTS", sorted(p.name for p in e.fragments_dir().glob("*.yaml")))
"""


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_non_editable_install_runs_from_anywhere(tmp_path, embedded_arithmetic):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, dict(os.environ))
    python = str(venv / "bin" / "python")
    # PYTHONPATH or a cwd inside the clone would let the clone's lit_reason win: keep both out
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               LIT_REASON_CACHE=str(Path(embedded_arithmetic).parent))
    build = tmp_path / "src"  # a copy of the sources (links followed): the clone's build/ stays untouched
    shutil.copytree(REPO / "lit_reason", build / "lit_reason", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, build / name)
    # the wheel is built with this interpreter's setuptools (the venv's bundled one may be older)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(build)], tmp_path, env)
    wheels = list((tmp_path / "dist").glob("lit_reason-*.whl"))
    assert len(wheels) == 1, wheels
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[0])], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = run([python, "-c", PROBE], outside, env).stdout
    lines = dict(line.split(" ", 1) for line in probe.splitlines())
    site = venv / "lib"
    # the venv's own installed copy, not the editable clone of the base environment
    assert Path(lines["FILE"]).is_relative_to(site), probe
    assert Path(lines["RECIPES"]).is_relative_to(site) and lines["SFT"] == "True", probe
    assert "value_calibration.yaml" in lines["FRAGMENTS"], probe

    proc = run([python, "-m", "lit_reason", "evaluate", "--policy", "embedded:arithmetic", "--task", "arithmetic",
                "--limit", "20", "--max-new-tokens", "48", "--output", "results.json"], outside, env)
    assert "building embedded" not in proc.stderr  # the cache was found, nothing retrained
    result = json.loads((outside / "results.json").read_text())
    assert result["n"] == 20 and 0.0 <= result["accuracy"] <= 1.0
    assert "greedy pass@1" in proc.stdout, proc.stdout
