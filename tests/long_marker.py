"""Keep the `long` marker honest: name the unmarked tests that took long.

A test over about ten seconds belongs out of the quick run
(`-m "not mount and not long"`). Timing on a shared machine varies too
much to fail a test for it, so the run ends with a list of the unmarked
tests whose setup, call and teardown together took over LONG_SECONDS, for
whoever reads it to mark (or speed up). A test that uses the Ceph cluster
fixture is marked `ceph` and `long` here at collection, whatever its author wrote.
"""

from __future__ import annotations

import pytest

LONG_SECONDS = 10.0

# A test that uses this fixture starts or uses a real Ceph cluster.
CEPH_FIXTURE = "ceph_cluster"

# Seconds per unmarked test node id, summed over its setup, call and teardown.
_unmarked_seconds: dict[str, float] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the Ceph cluster `ceph` and `long` (before -m selects).

    Starting the cluster costs seconds, so the quick run must leave such a
    test out even when its author forgot a marker.
    """
    for item in items:
        if CEPH_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ceph)
            item.add_marker(pytest.mark.long)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add up each unmarked test's time, phase by phase."""
    if "long" not in report.keywords:
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List the unmarked tests over LONG_SECONDS, slowest first."""
    slow = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > LONG_SECONDS), reverse=True)
    if slow:
        terminalreporter.write_sep("-", f"tests over {LONG_SECONDS:.0f} s not marked long")
        for seconds, nodeid in slow:
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
