"""The SDK needs only grpcio, protobuf and msgspec; the server's needs are an extra.

tests/integration/test_sdk_alone.py installs the SDK alone into a fresh
environment; these checks are the cheap half, run on the sources: what the
SDK's modules import, what pyproject.toml promises, and how the ``lethedb``
command treats a missing server dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from lethedb_server._entry import MISSING_SERVER, SERVER_MODULES

ROOT = Path(__file__).resolve().parents[3]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SDK_PACKAGES = ("lethedb", "lethedb_contract")


def _names(requirements: list[str]) -> set[str]:
    """Normalized distribution names (PEP 503) of requirement strings."""
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        names.add(re.sub(r"[-_.]+", "-", match.group()).lower())
    return names


def _providers(module: str) -> set[str]:
    """The distributions that install the top-level *module* (here, in this venv)."""
    return _names(packages_distributions().get(module, []))


#: SDK subpackages that need an extra, and the extra: ``import lethedb`` never loads them.
OPTIONAL_SUBPACKAGES = {ROOT / "client" / "lethedb" / "eventsourcing": "eventsourcing"}


def _imports(paths: list[Path]) -> set[str]:
    """Top-level modules imported in *paths*, less the standard library's."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__"}


def _sdk_imports() -> set[str]:
    """Top-level modules imported anywhere in the SDK's code, generated code included,
    but for the optional subpackages."""
    paths = [
        path
        for package in SDK_PACKAGES
        for path in (ROOT / "client" / package).rglob("*.py")
        if not any(path.is_relative_to(optional) for optional in OPTIONAL_SUBPACKAGES)
    ]
    return _imports(paths)


def test_the_sdk_imports_only_what_its_dependencies_provide():
    third_party = _sdk_imports() - set(SDK_PACKAGES)
    assert third_party == {"grpc", "google", "msgspec"}
    provided = set().union(*(_providers(module) for module in third_party))
    assert _names(PROJECT["dependencies"]) == {"grpcio", "protobuf", "msgspec"}
    assert provided == {"grpcio", "protobuf", "msgspec"}


def test_an_optional_subpackage_imports_only_the_sdk_and_its_extra():
    for subpackage, extra in OPTIONAL_SUBPACKAGES.items():
        third_party = _imports(list(subpackage.rglob("*.py"))) - set(SDK_PACKAGES)
        assert third_party == {extra}, subpackage
        assert _providers(extra) <= _names(PROJECT["optional-dependencies"][extra])


def test_the_server_extra_is_what_the_command_reports_missing():
    """SERVER_MODULES names the modules of exactly the server extra's distributions."""
    extra = _names(PROJECT["optional-dependencies"]["server"])
    assert set().union(*(_providers(module) for module in SERVER_MODULES)) == extra


def test_the_console_script_is_the_guarded_entry():
    assert PROJECT["scripts"] == {"lethedb": "lethedb_server._entry:main"}


def _entry(blocked: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the console script's main with *blocked* made unimportable (as if not installed)."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None; "
        "from lethedb_server._entry import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )


def test_a_missing_server_dependency_is_one_line_and_exit_2():
    ran = _entry("lmdb", "--version")
    assert (ran.returncode, ran.stdout, ran.stderr) == (2, "", MISSING_SERVER + "\n")


def test_any_other_missing_module_is_not_disguised():
    ran = _entry("tomllib", "--version")
    assert ran.returncode == 1
    assert "ModuleNotFoundError" in ran.stderr
    assert MISSING_SERVER not in ran.stderr


def test_with_the_server_extra_the_command_runs():
    ran = _entry("__no_such_module__", "--version")
    assert (ran.returncode, ran.stdout.split()[0]) == (0, "lethedb")
