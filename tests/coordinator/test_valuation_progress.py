"""A long valuation is shown as it goes: log lines for a service, a bar on a terminal."""

from __future__ import annotations

import logging

import pytest

from fedledger.coordinator.rounds import ValuationProgress


def test_a_service_logs_a_long_valuation_every_so_often(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    progress = ValuationProgress(
        7, show_after_s=3, log_every_s=10, terminal=False, clock=lambda: now[0]
    )
    caplog.set_level(logging.INFO, logger="fedledger.coordinator")
    for at, done in ((101.0, 100), (104.0, 400), (110.0, 900), (114.5, 1300), (125.0, 2000)):
        now[0] = at
        progress(done, 4000)
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "fedledger.coordinator"]
    # Nothing in the first 3 s; then a line at most every 10 s.
    assert lines == [
        "round 7: valued 400 of 4000 coalitions in 4 s",
        "round 7: valued 1300 of 4000 coalitions in 14 s",
        "round 7: valued 2000 of 4000 coalitions in 25 s",
    ]


def test_a_terminal_gets_a_bar_that_goes_when_the_valuation_ends() -> None:
    now = [0.0]
    progress = ValuationProgress(3, show_after_s=1, terminal=True, clock=lambda: now[0])
    progress(10, 100)
    assert progress._bar is None  # a short valuation shows nothing
    now[0] = 2.0
    progress(50, 100)
    bar = progress._bar
    assert bar is not None and bar.tasks[0].completed == 50 and bar.tasks[0].total == 100
    progress.close()
    assert progress._bar is None
