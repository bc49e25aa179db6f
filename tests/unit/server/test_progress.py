"""The progress line of long operator commands: one rewritten line on a tty, log lines elsewhere."""

from __future__ import annotations

import io

from lethedb_server.ops.progress import LOG_INTERVAL_S, ProgressBar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_rewritten_in_place_and_ended_on_close():
    stream, clock = FakeTty(), Clock()
    with ProgressBar("verify", stream=stream, clock=clock) as bar:
        bar.update(0, 1000)
        clock.now += 1
        bar.update(500, 1000)
        clock.now += 1
        bar.update(1000, 1000)
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert len(frames) == 3  # the last one already shows the final state
    assert "500 / 1,000" in frames[1]
    assert "50%" in frames[1]
    assert "500 events/s" in frames[1]
    assert "ETA 1s" in frames[1]
    assert "[" + "#" * 24 + "]" in frames[-1]
    assert "100%" in frames[-1]


def test_a_shorter_line_covers_the_rest_of_the_longer_one_before_it():
    stream, clock = FakeTty(), Clock()
    bar = ProgressBar("verify", stream=stream, clock=clock, interval=0)
    bar.update(0, 10**9)
    clock.now += 1
    bar.update(10**8, 10**9)
    clock.now += 1
    bar.update(10**8, 10**8)  # no ETA any more: a shorter line
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames[-1]) == len(frames[-2])


def test_a_terminal_is_redrawn_at_most_every_tenth_of_a_second():
    stream, clock = FakeTty(), Clock()
    bar = ProgressBar("verify", stream=stream, clock=clock)
    for done in range(100):
        bar.update(done, 100)
        clock.now += 0.01
    assert stream.getvalue().count("\r") == 10


def test_elsewhere_a_whole_line_is_printed_every_two_seconds():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar("verify", stream=stream, clock=clock)
    for step, done in enumerate(range(0, 10_001, 125)):
        clock.now = 100.0 + step * 0.125  # 1,000 events/s for 10 s
        bar.update(done, 10_000)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 1 + int(10 / LOG_INTERVAL_S)  # the first, then one every 2 s
    assert lines[0].startswith("verify  0 / 10,000")
    assert lines[-1].startswith("verify  10,000 / 10,000  100%")
    assert "1,000 events/s" in lines[-1]
    assert "#" not in lines[-1]


def test_the_final_state_is_drawn_on_close_unless_already_shown():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar("verify", stream=stream, clock=clock)
    clock.now += 1
    bar.update(10, 20)
    clock.now += 1
    bar.update(20, 20)  # within two seconds of the last line: not drawn yet
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["10 / 20", "20 / 20"]
    assert lines[-1].endswith("10 events/s")


def test_the_rate_counts_from_the_bar_s_start_and_initial_work():
    """A rebuild resuming from a checkpoint must not claim the skipped part as speed."""
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar("rebuild", unit="events", stream=stream, clock=clock, initial=9000)
    clock.now += 2
    bar.update(9200, 10_000)
    assert bar.rate(clock.now) == 100
    assert "100 events/s  ETA 8s" in stream.getvalue().splitlines()[-1]


def test_a_walk_finished_before_its_first_update_still_shows_its_rate():
    stream, clock = io.StringIO(), Clock()
    with ProgressBar("verify", stream=stream, clock=clock) as bar:
        clock.now += 0.5
        bar.update(20_000, 20_000)
    assert stream.getvalue() == "verify  20,000 / 20,000  100%  40,000 events/s\n"


def test_an_empty_log_is_complete():
    stream = io.StringIO()
    with ProgressBar("verify", stream=stream, clock=Clock()) as bar:
        bar.update(0, 0)
    assert "0 / 0  100%" in stream.getvalue()


def test_nothing_is_drawn_without_an_update():
    stream = io.StringIO()
    ProgressBar("verify", stream=stream).close()
    assert stream.getvalue() == ""


def test_a_closed_stream_does_not_break_the_work():
    stream = io.StringIO()
    bar = ProgressBar("verify", stream=stream, clock=Clock())
    stream.close()
    bar.update(1, 2)
    bar.close()
    bar.close()


def test_work_cut_short_ends_the_line_marked_interrupted():
    stream, clock = FakeTty(), Clock()
    try:
        with ProgressBar("verify", stream=stream, clock=clock) as bar:
            bar.update(0, 1000)
            clock.now += 1
            bar.update(300, 1000)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    text = stream.getvalue()
    assert text.endswith("(interrupted)\n")
    assert text.count("\n") == 1
    assert "300 / 1,000" in text.rsplit("\r", 1)[-1]
