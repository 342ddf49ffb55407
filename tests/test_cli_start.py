"""What every command pays before its work: nothing looked up that only one option needs.

A `backupfs backup` of a small RBD incremental takes about half a second,
most of it Python's start (bench/rbd_vs_export.py); the version lookup
(importlib.metadata, 15 ms) was part of it for every command.
"""

from __future__ import annotations

import subprocess
import sys


def test_building_the_parser_does_not_look_up_the_version() -> None:
    code = ("import sys; from backupfs.cli import build_parser; build_parser(); "
            "print('importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "build_parser imported importlib.metadata (the version is only for --version)"
