"""Soak, the quick version: half a minute of guest writes and incrementals every
two seconds; bench/soak.py runs it for ten minutes or more and prints figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.soak import soak

pytestmark = [pytest.mark.mount, pytest.mark.long]

SECONDS = float(os.environ.get("SOAK_SECONDS", "25"))


def test_soak(tmp_path: Path) -> None:
    result = soak(tmp_path / "soak", SECONDS, interval=2.0)
    print(result.render())
    assert result.backups >= 5 and result.writes > 100
    assert result.mismatches == 0
    assert result.verify_ok
    assert result.rss_end_kib - result.rss_start_kib < 64 * 1024
