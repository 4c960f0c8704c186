"""The cached SFT checkpoint behind ``embedded:arithmetic``.

On first use it is built by running the SFT recipe (``recipes/sft.yaml``) in a subprocess, exactly
as a user would, with a config fragment that exports the final policy. The export goes to a
temporary folder inside the cache and is renamed into place, so concurrent first uses cannot leave
a half-written checkpoint: a loser of the race finds the winner's folder and uses it. A file lock
makes the second process wait instead of training the same model twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from lit_reason.io import build_once

CACHE_ENV = "LIT_REASON_CACHE"
# bump when the recipe or the tiny model changes, so stale caches are not reused
EMBEDDED_VERSION = "v1"
RECIPES = {"arithmetic": "sft.yaml"}


def cache_dir() -> Path:
    """``$LIT_REASON_CACHE`` or ``~/.cache/lit_reason``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_reason").expanduser()


def recipes_dir() -> Path:
    """The shipped recipes: ``lit_reason/recipes`` inside the installed package.

    In the repository that folder links to the top-level ``recipes/``; a wheel or a
    non-editable install carries a copy (``package-data`` in ``pyproject.toml``), so the
    recipes are found from any working directory.
    """
    return Path(str(resources.files("lit_reason") / "recipes"))


def fragments_dir() -> Path:
    """The shipped config fragments (the repository's top-level ``callbacks/*.yaml``)."""
    return Path(str(resources.files("lit_reason") / "fragments"))


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
    return build_once(embedded_path(task), _is_policy_folder, lambda work: _build(task, work))


def _is_policy_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _build(task: str, work: Path) -> Path:
    """Trains ``embedded:<task>`` with its recipe in ``work``; returns the exported policy folder.

    The subprocess runs in ``work``, so nothing depends on the caller's working directory and no
    relative path of the recipe writes outside the build folder.
    """
    recipe = recipes_dir() / RECIPES[task]
    if not recipe.is_file():
        raise FileNotFoundError(f"cannot build embedded:{task}: recipe {recipe} is missing")
    export = work / "policy"
    fragment = work / "export.yaml"
    fragment.write_text(
        "trainer:\n"
        f"  default_root_dir: {work / 'run'}\n"
        "  callbacks+:\n"
        "    - class_path: lit_reason.callbacks.ExportPolicy\n"
        f"      init_args: {{dirpath: {export}}}\n"
    )
    print(f"[lit_reason] building embedded:{task} with {recipe} (first use; cached in {embedded_path(task)})",
          file=sys.stderr)
    cmd = [sys.executable, "-m", "lit_reason", "fit", "--config", str(recipe), "--config", str(fragment)]
    proc = subprocess.run(cmd, cwd=work)
    if proc.returncode != 0 or not _is_policy_folder(export):
        raise RuntimeError(f"building embedded:{task} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return export
