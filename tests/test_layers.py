"""The package's layers import only downwards (docs/architecture.md, "Layers").

Every ``import`` statement of every module is read with ``ast`` (module level and inside
functions), so a lazy import from a higher layer is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_reason"

# a layer may not import these subpackages of lit_reason
FORBIDDEN = {
    "losses": {"methods", "callbacks", "commands", "cli", "data", "rollout", "models", "search", "metrics"},
    "tasks": {"methods", "callbacks", "commands", "cli"},
    "models": {"methods", "callbacks", "commands", "cli"},
    "rollout": {"methods", "callbacks", "commands", "cli"},
    "data": {"methods", "callbacks", "commands", "cli"},
    "search": {"methods", "callbacks", "commands", "cli"},
    "metrics": {"methods", "callbacks", "commands", "cli"},
    "callbacks": {"commands", "cli"},
    "methods": {"commands", "cli"},
}


def lit_reason_imports(path: Path) -> set[str]:
    """The first component below ``lit_reason`` of every module ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lit_reason" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    offenders = {}
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        bad = lit_reason_imports(path) & FORBIDDEN[layer]
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not offenders, f"{layer}/ imports from a higher layer: {offenders}"


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lit_reason.commands.collect import main\n    import lit_reason.methods.dvo\n")
    assert lit_reason_imports(module) == {"commands", "methods"}
