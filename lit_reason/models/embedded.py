"""The cached SFT checkpoint behind ``embedded:arithmetic``.

On first use it is built by running the SFT recipe (``recipes/sft.yaml``) in a subprocess, exactly
as a user would, with a config fragment that exports the final policy. The export goes to a
temporary folder inside the cache and is renamed into place, so concurrent first uses cannot leave
a half-written checkpoint: a loser of the race finds the winner's folder and uses it. A file lock
makes the second process wait instead of training the same model twice.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "LIT_REASON_CACHE"
# bump when the recipe or the tiny model changes, so stale caches are not reused
EMBEDDED_VERSION = "v1"
RECIPES = {"arithmetic": "sft.yaml"}


def cache_dir() -> Path:
    """``$LIT_REASON_CACHE`` or ``~/.cache/lit_reason``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_reason").expanduser()


def recipes_dir() -> Path:
    """The repository's ``recipes/`` folder (beside the package)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def embedded_path(task: str) -> Path:
    return cache_dir() / f"embedded-{task}-{EMBEDDED_VERSION}"


def ensure_embedded(task: str) -> Path:
    """Returns the folder of ``embedded:<task>``, building it with its recipe on first use.

    Args:
        task: ``arithmetic``.

    Returns:
        A ``save_pretrained`` folder holding the model and the tokenizer.
    """
    if task not in RECIPES:
        raise ValueError(f"unknown embedded policy 'embedded:{task}'; known: " + ", ".join(f"embedded:{t}" for t in RECIPES))
    target = embedded_path(task)
    if (target / "config.json").is_file():
        return target
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # built by another process while we waited
            return target
        _build(task, target)
    return target


def _build(task: str, target: Path) -> None:
    recipe = recipes_dir() / RECIPES[task]
    if not recipe.is_file():
        raise FileNotFoundError(f"cannot build embedded:{task}: recipe {recipe} is missing")
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
    try:
        export = work / "policy"
        fragment = work / "export.yaml"
        fragment.write_text(
            "trainer:\n"
            f"  default_root_dir: {work / 'run'}\n"
            "  callbacks+:\n"
            "    - class_path: lit_reason.callbacks.ExportPolicy\n"
            f"      init_args: {{dirpath: {export}}}\n"
        )
        print(f"[lit_reason] building embedded:{task} with {recipe} (first use; cached in {target})", file=sys.stderr)
        cmd = [sys.executable, "-m", "lit_reason", "fit", "--config", str(recipe), "--config", str(fragment)]
        proc = subprocess.run(cmd, cwd=recipe.parent.parent)
        if proc.returncode != 0 or not (export / "config.json").is_file():
            raise RuntimeError(f"building embedded:{task} failed (exit {proc.returncode}): {' '.join(cmd)}")
        os.replace(export, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
