"""The layering rule (DESIGN.md): foundations <- sessions <- runs <- queues <- settings (the top of
the house: settings, the URL conf and the worker's wiring), and the runner imports none of them (nor
Django). No file is exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("agentrun", "sessions", "runs", "queues", "settings", "runner")
# What each package may import from the others.
ALLOWED = {
    "agentrun": set(),
    "sessions": {"agentrun"},
    "runs": {"agentrun", "sessions"},
    "queues": {"agentrun", "sessions", "runs"},
    "settings": {"agentrun", "sessions", "runs", "queues"},
    "runner": set(),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def sources():
    for package in APPS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield package, path


@pytest.mark.parametrize(("package", "path"), list(sources()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_imports_follow_the_layers(package, path):
    relative = str(path.relative_to(ROOT))
    used = imports_of(path) & set(APPS)
    forbidden = used - ALLOWED[package] - {package}
    assert not forbidden, f"{relative} imports {sorted(forbidden)}"
    if package == "runner":
        assert not imports_of(path) & {"django", "rest_framework", "psycopg"}, f"{relative} needs the server"
