"""What every benchmark report shares: the machine, the summary figures, the file.

The end-to-end (:mod:`benchmarks.e2e`), subscription (:mod:`benchmarks.subscribe`)
and peer (:mod:`benchmarks.peers`) tools all describe the machine they ran on,
summarise call times with the same nearest-rank percentile, flag cases that
other jobs disturbed, and write a Markdown report under a name that never
overwrites an earlier one. Those pieces live here, once, so the three reports
cannot drift apart. Nothing here starts a process, measures one or knows a
workload (that is :mod:`benchmarks.harness`), and nothing imports grpc or the
server, so the helpers are cheap to test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

#: Percent of a core that other jobs may use during a case before a report
#: flags the case as measured on a busy machine.
NOISY_OTHER_CPU = 25.0


# -- summary figures ---------------------------------------------------------------------


def percentile_ms(values_ns: Sequence[int], q: float) -> float:
    """The nearest-rank *q* percentile of nanosecond durations, in milliseconds.

    NaN for no values, so an empty case prints as ``-`` rather than as zero.
    """
    if not values_ns:
        return float("nan")
    ordered = sorted(values_ns)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] / 1e6


def median(values: Iterable[float]) -> float:
    """The median of the figures that were measured (NaNs left out); NaN if none was."""
    clean = sorted(v for v in values if v == v)
    if not clean:
        return float("nan")
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2


def other_cpu_pct(machine_busy: float | None, duration_s: float, ours_cpu_s: float) -> float | None:
    """Percent of a core used by anything but the measured processes during a case.

    *machine_busy* is the machine's busy cores over the case (busy CPU seconds
    ÷ *duration_s*), *ours_cpu_s* the CPU seconds of the server and the load.
    What is left is the orchestrator, the kernel and other jobs: a case with a
    lot of it measured a busy machine.
    """
    if machine_busy is None or not duration_s:
        return None
    return max(0.0, (machine_busy - ours_cpu_s / duration_s) * 100)


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    """A figure for a table: thousands separated, ``-`` when missing or NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


# -- the machine -------------------------------------------------------------------------


def dist_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution *dist*, or *missing*."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit() -> str:
    """The tree's commit, marked when tracked files differ from it."""
    described = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        described = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        described += " (with uncommitted changes)" if dirty else ""
    return described


def environment(tmp_root: Path) -> dict[str, str]:
    """The report's environment table: CPU, kernel, data filesystem, versions, commit."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "CPUs (nproc)": f"{len(os.sched_getaffinity(0))} of {os.cpu_count()}",
        "CPU model": model,
        "Kernel": f"{platform.system()} {platform.release()}",
        "Data directory filesystem": filesystem_of(tmp_root),
        "Python": platform.python_version(),
        "grpcio": dist_version("grpcio"),
        "protobuf": dist_version("protobuf"),
        "lmdb (py-lmdb)": dist_version("lmdb"),
        "cryptography": dist_version("cryptography"),
        "msgspec": dist_version("msgspec"),
        "LetheDB commit": commit(),
    }


def filesystem_of(path: Path) -> str:
    """The type and device of the filesystem holding *path* (the path itself is a
    throwaway temporary directory, so the report leaves it out)."""
    best, fstype, device = "", "unknown", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, kind = line.split()[:3]
            resolved = str(path.resolve())
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) > len(best):
                best, fstype, device = mount, kind, dev
    return f"{fstype} on {device}"


# -- the document ------------------------------------------------------------------------


def environment_section(env: dict[str, str]) -> list[str]:
    """The ``## Environment`` heading and table (a caller may append rows to it)."""
    rows = [f"| {k} | {v} |" for k, v in env.items()]
    return ["", "## Environment", "", "| | |", "|---|---|", *rows]


def command_line(module: str) -> str:
    """How this run was started, for the report's last line."""
    return f"Command: `python -m {module} {' '.join(sys.argv[1:])}`".replace("  ", " ")


def noisy_notes(keys: Sequence[str]) -> list[str]:
    """A note naming the cases other jobs disturbed (more than :data:`NOISY_OTHER_CPU`)."""
    if not keys:
        return []
    return [
        f"* **Other jobs used more than {NOISY_OTHER_CPU:.0f}% of a core during "
        f"{len(keys)} case(s)** ({', '.join(keys)}): rerun those figures on a quiet "
        "machine before quoting them."
    ]


def waited_notes(waited_s: float) -> list[str]:
    """A note saying how long the run waited for the machine to go quiet, if it did."""
    if not waited_s:
        return []
    return [f"* The run waited {waited_s:.0f} s in all for other jobs to go quiet."]


# -- the file ----------------------------------------------------------------------------


def add_output_args(
    parser: argparse.ArgumentParser,
    tmp_help: str = "where data directories go (default: $TMPDIR)",
) -> None:
    """``--tmp-dir``, ``--output-dir`` and ``--no-write``, the same in every tool."""
    parser.add_argument("--tmp-dir", type=Path, default=None, help=tmp_help)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true", help="print the report only")


def results_stem(output_dir: Path, name: str, started: dt.datetime, suffix: str = "") -> str:
    """``<name>-<date><suffix>``, or with the start time added when that report exists.

    A second run on the same day must not overwrite the first: earlier
    reports are what later ones are compared with.
    """
    stem = f"{name}-{started:%Y-%m-%d}{suffix}"
    if (output_dir / f"{stem}.md").exists():
        stem = f"{name}-{started:%Y-%m-%d-%H%M}{suffix}"
    return stem


def report_stem(output_dir: Path, name: str, started: dt.datetime, quick: bool) -> str:
    """:func:`results_stem` with the ``-quick`` suffix of a ``--quick`` run; creates the dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return results_stem(output_dir, name, started, "-quick" if quick else "")


def write_markdown(
    output_dir: Path, name: str, started: dt.datetime, quick: bool, text: str
) -> Path:
    """Write a report as ``<output_dir>/<stem>.md`` (see :func:`report_stem`); return its path."""
    path = output_dir / f"{report_stem(output_dir, name, started, quick)}.md"
    path.write_text(text)
    return path


def publish(text: str, name: str, started: dt.datetime, args: argparse.Namespace) -> None:
    """Print a report and, unless ``--no-write``, write it (see :func:`write_markdown`).

    *args* is the tool's command line: :func:`add_output_args`'s options and ``--quick``.
    """
    print()
    print(text)
    if not args.no_write:
        path = write_markdown(args.output_dir, name, started, args.quick, text)
        print(f"Report written to {path}")
