"""Importing the engine starts no threads of its own (no spinning BLAS workers)."""

from __future__ import annotations

import os
import subprocess
import sys

COUNT_THREADS = "import engine.chain, os; print(len(os.listdir('/proc/self/task')))"


def _threads_after_import(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if env_value is not None:
        env["OPENBLAS_NUM_THREADS"] = env_value
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout)


def test_engine_import_starts_no_blas_threads() -> None:
    assert _threads_after_import(None) == 1


def test_an_explicit_blas_setting_wins() -> None:
    # The control: numpy's OpenBLAS does start workers when asked to (one
    # thread per CPU at most), so the test above can tell the difference.
    assert _threads_after_import("2") == min(2, os.cpu_count() or 1)
