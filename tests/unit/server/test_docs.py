"""The documents a new user follows literally: complete, consistent, and in the repository."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from lethedb_server.ops import config

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "CONFIGURATION.md").read_text()


def table_options(markdown: str) -> set[str]:
    """Every `name` in the first cell of a table row (``| `a`, `b` | ... |``)."""
    names: set[str] = set()
    for line in markdown.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([a-z0-9_]+)`", first_cell))
    return names


@pytest.mark.parametrize("document", ["README.md", "docs/CONFIGURATION.md"])
def test_every_option_is_in_the_configuration_tables(document):
    text = (ROOT / document).read_text()
    missing = set(config.field_names()) - table_options(text)
    assert not missing, f"{document} lacks options {sorted(missing)}"


def test_the_readme_starts_with_the_two_command_quick_start():
    first_block = README.split("```")[1]
    assert "make run" in first_block
    assert "make test" in first_block


def test_the_readme_spells_the_command_one_way():
    assert ".venv/bin/lethedb" not in README
    commands = re.findall(r"^(?:\$ )?(\S+) ", "\n".join(_shell_blocks(README)), re.MULTILINE)
    assert set(commands) <= {"lethedb", "make", ".", "python", "pip", "export"}, set(commands)


def _shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, re.DOTALL)


def test_the_license_file_is_the_apache_license_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text) > 10_000  # the full text, not a pointer to it


@pytest.mark.parametrize("path", ["users.db", "search.db", "examples/users.db", "users.db-wal"])
def test_databases_the_examples_create_are_ignored_by_git(path):
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, f"{path} is not ignored"
