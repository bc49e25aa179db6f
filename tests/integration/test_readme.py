"""The README's tour, run as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def tour_scripts() -> list[str]:
    tour = README.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", tour, re.DOTALL)


def test_the_tour_has_a_sync_and_an_asyncio_script():
    scripts = tour_scripts()
    assert len(scripts) == 2
    assert "asyncio.run(" in scripts[1]


def test_every_tour_script_runs_as_written(fresh_server, tmp_path):
    for number, script in enumerate(tour_scripts()):
        path = tmp_path / f"tour{number}.py"
        path.write_text(script.replace("localhost:50051", fresh_server.address))
        result = subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"script {number}:\n{script}\n{result.stderr}"
