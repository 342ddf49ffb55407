"""How much one device may cost in memory, and the check made before it does.

A device's memory grows with its granules (size / granularity): a dirty
bitmap holds one bit per granule, and a backup holds 8 bytes of checksum
per granule, twice during an incremental (its parent's and its own). The
granule count is a product of numbers a user types (``--granularity``) or
an image claims (a virtual size), so it is checked against a fixed limit
before anything is sized by it: a typo or a crafted header must be refused
in one line, not end in MemoryError after gigabytes were asked for.

2^27 granules: 1 GiB of checksums per full backup, 2 GiB while an
incremental runs, 16 MiB per bitmap. At the default 64 KiB that is a disk
of 8 TiB; a larger one needs a larger granularity (16 TiB at 128 KiB, the
largest, 8 PiB, at 64 MiB).
"""

from __future__ import annotations

from engine.errors import UsageError
from engine.units import format_size

MAX_GRANULES = 1 << 27
MAX_GRANULARITY = 64 * 1024 * 1024  # the coarsest bitmap (engine/bitmap.py)
MAX_DEVICE_SIZE = MAX_GRANULES * MAX_GRANULARITY  # 8 PiB


def granule_count(size: int, granularity: int) -> int:
    return -(-size // granularity)


def smallest_granularity(size: int) -> int | None:
    """The smallest power-of-two granularity that keeps ``size`` within the
    limit, or None if even the largest does not."""
    granularity = 512
    while granule_count(size, granularity) > MAX_GRANULES:
        granularity *= 2
        if granularity > MAX_GRANULARITY:
            return None
    return granularity


def check_granules(size: int, granularity: int, what: str) -> None:
    """Refuse a device of ``size`` bytes tracked at ``granularity`` whose
    bitmaps and checksums would exceed the limit; says what would fit."""
    count = granule_count(size, granularity)
    if count <= MAX_GRANULES:
        return
    fits = smallest_granularity(size)
    if fits is None:
        raise UsageError(
            f"{what} is {format_size(size)} ({size} bytes): larger than backupfs tracks "
            f"(at most {format_size(MAX_DEVICE_SIZE)}, {MAX_GRANULES} granules of at most "
            f"{format_size(MAX_GRANULARITY)})"
        )
    raise UsageError(
        f"{what} is {format_size(size)}: at a granularity of {format_size(granularity)} that is "
        f"{count} granules, more than the {MAX_GRANULES} whose checksums backupfs keeps in memory "
        f"({format_size(MAX_GRANULES * 8)} a backup); use --granularity {format_size(fits).replace(' ', '')} "
        "or larger"
    )
