"""The helpers every benchmark report shares compute and name things the same way.

The e2e, subscribe and peer tools all summarise call times, flag disturbed
cases, measure CPU and name their report files with these functions, so a
mistake here would skew every report at once.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import CpuMeter, free_port, log_tail, stop_process, tree_cpu_s
from benchmarks.report import (
    environment,
    environment_section,
    fmt,
    median,
    other_cpu_pct,
    percentile_ms,
    results_stem,
    write_markdown,
)

STARTED = dt.datetime(2026, 3, 4, 5, 6, tzinfo=dt.UTC)


def test_percentile_is_the_nearest_rank_in_milliseconds():
    values_ns = [ms * 1_000_000 for ms in range(100, 0, -1)]  # 1..100 ms, unsorted

    assert percentile_ms(values_ns, 0.5) == 50.0
    assert percentile_ms(values_ns, 0.99) == 99.0
    assert percentile_ms(values_ns, 0.999) == 100.0
    assert percentile_ms(values_ns, 0.0) == 1.0


def test_percentile_of_one_value_is_that_value_and_of_none_is_nan():
    assert percentile_ms([2_500_000], 0.01) == 2.5
    assert percentile_ms([2_500_000], 0.999) == 2.5
    assert math.isnan(percentile_ms([], 0.5))


def test_median_leaves_out_figures_that_were_not_measured():
    nan = float("nan")

    assert median([3.0, nan, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, nan, 2.0, 3.0]) == 2.5
    assert math.isnan(median([nan, nan]))
    assert math.isnan(median([]))


def test_other_cpu_is_the_machine_busy_time_the_measured_processes_did_not_use():
    # 1.5 cores busy for 2 s = 3 CPU seconds, 2 of them the server and the load.
    assert other_cpu_pct(1.5, 2.0, 2.0) == 50.0
    # Accounting granularity can make ours exceed the machine's: never negative.
    assert other_cpu_pct(0.5, 2.0, 2.0) == 0.0
    assert other_cpu_pct(None, 2.0, 1.0) is None
    assert other_cpu_pct(1.0, 0.0, 1.0) is None


def test_fmt_separates_thousands_and_shows_a_missing_figure_as_a_dash():
    assert fmt(12345.678) == "12,346"
    assert fmt(1.234, 2, " ms") == "1.23 ms"
    assert fmt(None) == "-"
    assert fmt(float("nan"), 2, "%") == "-"


def test_a_second_report_of_the_same_day_does_not_overwrite_the_first(tmp_path: Path):
    first = write_markdown(tmp_path, "e2e", STARTED, True, "first")
    second = write_markdown(tmp_path, "e2e", STARTED, True, "second")

    assert first.name == "e2e-2026-03-04-quick.md"
    assert second.name == "e2e-2026-03-04-0506-quick.md"
    assert first.read_text() == "first"
    assert second.read_text() == "second"
    assert results_stem(tmp_path, "peers", STARTED) == "peers-2026-03-04"


def test_environment_names_the_data_filesystem_and_renders_as_a_table(tmp_path: Path):
    env = environment(tmp_path)

    assert env["Data directory filesystem"] != "unknown on "
    assert env["Python"] == ".".join(map(str, sys.version_info[:3]))
    section = environment_section(env)
    assert section[:5] == ["", "## Environment", "", "| | |", "|---|---|"]
    assert f"| Python | {env['Python']} |" in section


def test_free_port_is_a_loopback_port_a_server_can_bind():
    port = free_port()

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_cpu_meter_counts_the_cpu_the_measured_process_spends():
    meter = CpuMeter(os.getpid())
    start = time.process_time()
    while time.process_time() - start < 0.2:
        pass

    spent = meter.read()

    assert spent.server_cpu_s is not None
    assert spent.server_cpu_s >= 0.1  # 0.2 s of CPU burnt, ticks of 10 ms
    assert spent.machine_busy_s > 0
    # Not compared with the busy time: the kernel's iowait count can step back.
    assert spent.machine_total_s > 0


def test_process_tree_cpu_includes_children_that_have_exited():
    before = tree_cpu_s(os.getpid())
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)

    assert tree_cpu_s(os.getpid()) - before >= 0.2


def test_stop_process_stops_a_server_with_sigterm_and_returns_its_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    assert stop_process(proc) == -signal.SIGTERM


def test_log_tail_gives_the_last_lines_or_says_there_is_no_log(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)))

    assert log_tail(log, 2) == "line 48\nline 49"
    assert log_tail(tmp_path / "absent.log") == f"(no log at {tmp_path / 'absent.log'})"
    assert log_tail(tmp_path / "absent.log", missing="(no server log)") == "(no server log)"
