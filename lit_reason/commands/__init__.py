"""Commands of ``python -m lit_reason`` besides LightningCLI's fit/validate/test."""

from __future__ import annotations

import sys
from typing import Callable


def run_reporting_bad_input(run: Callable[[list[str]], int], argv: list[str]) -> int:
    """Runs a command; bad input (task, data, policy, output folder) exits 2 with one ``error:`` line
    naming the culprit instead of a traceback."""
    try:
        return run(argv)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
