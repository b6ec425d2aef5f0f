"""The stage order, read from dvc.yaml (the DAG is described there once, never here)."""

from __future__ import annotations

from graphlib import TopologicalSorter
from pathlib import Path

import yaml


def _paths(entries) -> list[str]:
    out = []
    for entry in entries or []:
        out.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return [p.rstrip("/") for p in out if "${" not in p]


def stage_order(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names so that every stage comes after the stages whose outputs it depends on."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for name, s in stages.items()}
    graph: dict[str, set[str]] = {}
    for name, stage in stages.items():
        needs = set()
        for dep in _paths(stage.get("deps")):
            for other, paths in outs.items():
                if other != name and any(dep == p or dep.startswith(p + "/") or p.startswith(dep + "/") for p in paths):
                    needs.add(other)
        graph[name] = needs
    return list(TopologicalSorter(graph).static_order())
