"""Every third-party package our code imports is declared in pyproject.toml, not borrowed from another's."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import ROOT

OURS = {"cli", "flows", "tui"}


def imported_top_levels() -> dict[str, set[str]]:
    """Top-level module name -> the files of cli/, flows/ and tui/ that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in [p for name in sorted(OURS) for p in (ROOT / name).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalised(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: sorted(files)[:3] for module, files in imported_top_levels().items()
        if module not in OURS and module not in sys.stdlib_module_names
        and not {normalised(d) for d in distributions.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml's dependencies: {undeclared}"
