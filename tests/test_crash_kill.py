"""SIGKILL of the mounted daemon and of the unmounted CLI at random moments.

The quick version: six kills (full, incremental and prune; daemon and CLI).
bench/crash_kill.py runs hundreds with the same checks (tests/crashkill.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.crashkill import Lab, Tally, run_rounds

pytestmark = [pytest.mark.mount, pytest.mark.long]

KILLS = int(os.environ.get("CRASH_KILLS", "6"))


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab", seed=1234)
    try:
        tally = run_rounds(lab, KILLS, Tally())
    finally:
        lab.cleanup()
    assert tally.kills == KILLS
    assert set(tally.by_kind) >= {"cli-full", "daemon-incremental", "cli-prune"}
