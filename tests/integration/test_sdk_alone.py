"""``pip install lethedb`` gives a working SDK without the server's dependencies.

A wheel is built from this checkout and installed, without extras, into a
fresh virtual environment (its dependencies come from pip's index or cache).
That environment must not hold LMDB, cryptography or the other server
dependencies, must talk to a real server (one run from the project's own
environment), and its ``lethedb`` command must say in one line what to install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from lethedb_server._entry import MISSING_SERVER, SERVER_MODULES
from tests.integration.serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 240.0


def _run(*args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def sdk_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh venv holding ``pip install lethedb`` (no extras)."""
    work = tmp_path_factory.mktemp("sdk-alone")
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    checkout = work / "checkout"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, checkout / name)
    for name in ("client", "server"):
        shutil.copytree(ROOT / name, checkout / name, ignore=skip)
    wheels = work / "wheels"
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", wheels, checkout,
        timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("lethedb-*.whl")
    venv = work / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # This environment's pip installs into the new one: no pip bootstrap there.
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel,
        timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    return python


def test_the_sdk_installs_without_the_servers_dependencies(sdk_python: Path):
    probe = _run(
        sdk_python,
        "-c",
        "import importlib.util, json, sys; "
        "print(json.dumps(sorted(m for m in sys.argv[1:] if importlib.util.find_spec(m))))",
        *sorted(SERVER_MODULES),
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []


def test_the_sdk_alone_appends_and_reads_against_a_running_server(
    sdk_python: Path, server: ServerProcess
):
    stream = f"sdk-alone-{uuid.uuid4().hex[:12]}"
    script = textwrap.dedent(
        """
        import json, sys
        import lethedb

        address, stream = sys.argv[1:]
        with lethedb.Client(address, timeout=10.0) as db:
            db.append(stream, lethedb.Event("Installed", {"extras": []}),
                      expected_version=lethedb.NO_STREAM)
            events = [(e.event_type, e.json()) for e in db.read_stream(stream)]
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {server_modules})
        print(json.dumps({"events": events, "loaded": loaded}))
        """
    ).replace("{server_modules}", repr(set(SERVER_MODULES)))
    used = _run(sdk_python, "-c", script, server.address, stream)
    assert used.returncode == 0, used.stderr
    assert json.loads(used.stdout) == {"events": [["Installed", {"extras": []}]], "loaded": []}


def test_the_command_says_in_one_line_what_to_install(sdk_python: Path):
    lethedb = sdk_python.parent / "lethedb"
    for args in (["serve", "--data", "unused"], ["append", "s", "E", "{}"], ["--version"]):
        ran = _run(lethedb, *args)
        assert (ran.returncode, ran.stdout, ran.stderr) == (2, "", MISSING_SERVER + "\n"), args
