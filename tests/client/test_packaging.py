"""skiplock-client is a distribution of its own that needs httpx and nothing of the engine: its
code imports only the standard library and httpx; importing it loads neither Flask, psycopg nor
skiplock; its wheel declares httpx alone, and installed into a fresh virtualenv away from the
checkout, beside httpx and its dependencies only (taken from this environment: no index), it
passes `pip check` and runs a task on the real API."""

from __future__ import annotations

import ast
import email
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import skiplock_client
from packaging.requirements import Requirement

from tests.helpers import ROOT

CLIENT = ROOT / "client"
ENGINE = ("flask", "werkzeug", "psycopg", "psycopg_pool", "skiplock", "api", "gunicorn", "marshmallow")
PIP_SECONDS = 300


def test_the_code_imports_only_the_standard_library_and_httpx():
    outside = set()
    for path in (CLIENT / "skiplock_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            outside |= {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"httpx"}
    assert outside == set()


def loaded_by_import(python: str, cwd: Path, env: dict | None = None) -> list[str]:
    code = (
        "import sys, skiplock_client\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE!r})))"
    )
    done = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [m for m in done.stdout.strip().split(",") if m]


def test_importing_the_client_loads_nothing_of_the_engine(tmp_path):
    assert loaded_by_import(sys.executable, tmp_path) == []


def dependency_closure(name: str) -> list[metadata.Distribution]:
    """The installed distribution `name` and what it requires (no extras), recursively."""
    found: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in found:
            continue
        found[dist.metadata["Name"].lower()] = dist
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def only(dists: list[metadata.Distribution], into: Path) -> Path:
    """A directory holding (as links) these installed distributions' files and nothing else."""
    into.mkdir()
    for dist in dists:
        for top in {f.parts[0] for f in dist.files or () if ".." not in f.parts}:
            if not (into / top).exists():
                (into / top).symlink_to(Path(dist.locate_file(top)).resolve())
    return into


@pytest.mark.slow
def test_the_wheel_declares_httpx_alone_and_runs_installed_on_its_own(tmp_path, served):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    sources = shutil.copytree(
        CLIENT, tmp_path / "client", ignore=shutil.ignore_patterns("*.egg-info", "build")
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(sources)],
        capture_output=True, text=True, timeout=PIP_SECONDS,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("skiplock_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(archive.read(info))
    assert (meta["Name"], meta["Version"]) == ("skiplock-client", skiplock_client.__version__)
    assert [Requirement(r).name for r in meta.get_all("Requires-Dist")] == ["httpx"]
    assert {n.split("/")[0] for n in names} == {
        "skiplock_client",
        f"skiplock_client-{meta['Version']}.dist-info",
    }
    assert "skiplock_client/py.typed" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    installed = subprocess.run([*pip, "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=PIP_SECONDS)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    deps = only(dependency_closure("httpx"), tmp_path / "httpx-only")
    Path(site, "httpx-only.pth").write_text(f"{deps}\n")

    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    checked = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert loaded_by_import(python, tmp_path, clean) == []

    script = textwrap.dedent(f"""
        import skiplock_client
        assert skiplock_client.__file__.startswith({str(venv)!r}), skiplock_client.__file__
        with skiplock_client.Client({served.base_url!r}, {served.token!r}) as client:
            task = client.submit("greet", {{"name": "wheel"}})
            print(client.wait(task.id, timeout=60, raise_on_failure=True).result["greeting"])
    """)  # fmt: skip
    ran = subprocess.run(
        [python, "-c", script], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "Hello, wheel!"
