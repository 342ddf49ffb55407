"""Sizes as people type them (``64K``, ``1.5G``) and as they like to read them."""

from __future__ import annotations

import re
from fractions import Fraction

from engine.errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)

# The lowest copy rate limit a backup accepts, in bytes per second. Below
# it a limit is likelier a slip (rate=100 for 100M) than a wish, and the
# backup would hold its device's one job slot for days.
MIN_RATE = 1 << 20


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``4096``, ``64K``, ``64KiB``, ``1.5G`` into bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r} is not a size (examples: 4096, 64K, 1M, 2G)")
    if len(m.group(1)) > 30:
        raise UsageError(f"{what} {text!r} is far too large")
    value = Fraction(m.group(1)) * _SUFFIX[m.group(2).upper()]  # exact: no float rounding
    if value.denominator != 1:
        raise UsageError(f"{what} {text!r} is not a whole number of bytes")
    return int(value)


def check_rate(rate: int | None, what: str = "rate") -> int | None:
    """Refuse a copy rate limit below MIN_RATE; None is no limit.

    The engine checks it as well as the trigger and the CLI, which only
    check first to answer in their own words.
    """
    if rate is not None and rate < MIN_RATE:
        raise UsageError(f"{what} must be at least {MIN_RATE >> 20}M (bytes per second)")
    return rate


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB'; exact values stay short ('64 KiB')."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n} B"
