"""Where the real data sets (GSM8K, MATH-500) live on this machine.

The data are not shipped with the package; they sit in a folder beside the repository
(``../shared/data``) or wherever ``$LIT_REASON_DATA`` points.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LIT_REASON_DATA"

# The repository root is the folder that holds the ``lit_reason`` package directory.
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path | None:
    """Returns the folder holding ``gsm8k/``, ``math500/`` and friends, or None if none is found.

    Lookup order:
        1. ``$LIT_REASON_DATA`` when set (an error when it names no folder, since a typo there
           would otherwise silently fall through to another copy of the data);
        2. ``../shared/data`` relative to the current working directory;
        3. ``../shared/data`` relative to the repository root.

    Returns:
        The resolved folder, or None when no candidate exists.

    Raises:
        FileNotFoundError: ``$LIT_REASON_DATA`` is set but is not a directory.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${ENV_VAR} is set to {env!r}, which is not a directory")
        return path.resolve()
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve()
    return None
