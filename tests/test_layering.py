"""The shape of the house: the engine (skiplock/) imports neither Flask nor gunicorn nor the API,
nothing imports upward (the layers below), and no module or class outgrows its room. Read from
the code itself (ast), and one real import of every engine module in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Lower ranks never import higher ones: a module may import its own rank and below.
LAYERS = {
    "skiplock.errors": 0,
    "skiplock.settings": 0,
    "skiplock.tokens": 0,
    "skiplock.stream_tokens": 0,
    "skiplock.task_exceptions": 0,
    "skiplock.tracing": 0,
    "skiplock.logs": 1,
    "skiplock.db": 1,
    "skiplock.registry": 1,
    "skiplock.builtin_tasks": 1,
    "skiplock.embedded": 1,
    "skiplock.submission": 1,
    "skiplock.schedules": 1,
    "skiplock.workflows": 1,
    "skiplock.sql": 2,
    "skiplock.keys": 3,
    "skiplock.enqueue": 3,
    "skiplock.webhooks": 3,
    "skiplock.startup": 3,
    "skiplock.worker": 4,
    "skiplock.cli": 5,
    "skiplock.launcher": 5,
    "api": 6,
}
# What the engine must never load: the web stack and the API itself.
WEB_ONLY = ("flask", "flask_smorest", "gunicorn", "werkzeug", "api")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250


def source_modules() -> dict[str, Path]:
    modules = {}
    for package in ("skiplock", "api"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def rank(module: str) -> int | None:
    """The layer of a module: its longest prefix in LAYERS (None: not ours)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in LAYERS:
            return LAYERS[prefix]
    return None


def imported(module: str, path: Path) -> set[str]:
    """Every module `module` imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def test_every_module_has_a_layer():
    unplaced = [module for module in source_modules() if rank(module) is None and module != "skiplock"]
    assert unplaced == [], "add these modules to LAYERS"


def test_nothing_imports_upward():
    upward = []
    for module, path in source_modules().items():
        own = rank(module)
        if own is None:
            continue
        for target in imported(module, path):
            theirs = rank(target)
            if theirs is not None and theirs > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert upward == []


def test_the_engine_imports_no_web_stack():
    """Import every engine module for real; none may bring in Flask, gunicorn or the API."""
    engine = [module for module in source_modules() if module.split(".")[0] == "skiplock"]
    engine = [m for m in engine if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {engine!r}: importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {WEB_ONLY!r})\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the engine loaded: {done.stdout.strip()}"


@pytest.mark.parametrize("package", ["skiplock", "api"])
def test_no_module_or_class_outgrows_its_room(package):
    too_big = []
    for module, path in source_modules().items():
        if module.split(".")[0] != package:
            continue
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            too_big.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.ClassDef)
                and (size := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES
            ):
                too_big.append(f"{module}.{node.name}: {size} lines")
    assert too_big == []
