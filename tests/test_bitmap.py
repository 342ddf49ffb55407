"""engine/bitmap: marking, runs, the lifecycle, persistence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bitmap import (
    BitmapFileError,
    DirtyBitmap,
    SourceIdentity,
    TrackedBitmap,
    load_bitmap,
    save_bitmap,
)
from engine.errors import UsageError

KiB = 1024
MiB = 1024 * KiB


def test_mark_touches_every_granule_it_overlaps() -> None:
    b = DirtyBitmap(10 * 64 * KiB, 64 * KiB)
    b.mark(64 * KiB - 1, 2)  # one byte on each side of a boundary
    assert list(b.runs()) == [(0, 128 * KiB)]
    b.mark(5 * 64 * KiB, 1)
    assert list(b.runs()) == [(0, 128 * KiB), (5 * 64 * KiB, 6 * 64 * KiB)]
    b.mark(9 * 64 * KiB + 100, 10 * MiB)  # clipped at the device end
    assert b.count() == 4
    b.mark(3 * 64 * KiB, 0)
    assert b.count() == 4


def test_short_last_granule_counts_what_it_covers() -> None:
    size = 3 * 64 * KiB + 512
    b = DirtyBitmap(size, 64 * KiB)
    b.mark(size - 1, 1)
    assert list(b.runs()) == [(3 * 64 * KiB, size)]
    assert b.dirty_bytes() == 512
    b.mark(0, 1)
    assert b.dirty_bytes() == 64 * KiB + 512


@pytest.mark.parametrize("g", [0, 1000, 256, 128 * MiB])
def test_granularity_must_be_a_power_of_two_in_range(g: int) -> None:
    with pytest.raises(UsageError):
        DirtyBitmap(MiB, g)


@given(
    st.sampled_from([512, 4096, 65536, 1 << 20]),
    st.lists(st.tuples(st.integers(0, 8 * MiB), st.integers(0, 300 * KiB)), max_size=40),
)
@settings(max_examples=150, deadline=None)
def test_runs_match_a_model(granularity: int, writes: list[tuple[int, int]]) -> None:
    size = 8 * MiB - 512
    b = DirtyBitmap(size, granularity)
    model: set[int] = set()
    for off, n in writes:
        b.mark(off, n)
        end = min(off + n, size)
        if n and off < size:
            model.update(range(off // granularity, (end - 1) // granularity + 1))
    runs = list(b.runs())
    granules = {g for a, e in runs for g in range(a // granularity, -(-e // granularity))}
    assert granules == model
    assert b.count() == len(model)
    # Runs are maximal, ordered and inside the device.
    for (a1, e1), (a2, e2) in zip(runs, runs[1:]):
        assert e1 < a2
    assert all(0 <= a < e <= size for a, e in runs)
    assert b.run_count() == len(runs)


def test_freeze_abdicate_keeps_new_writes() -> None:
    t = TrackedBitmap(DirtyBitmap(MiB, 64 * KiB))
    t.active.mark(0, 1)
    frozen = t.freeze()
    t.active.mark(512 * KiB, 1)  # a write while the job runs
    assert list(frozen.runs()) == [(0, 64 * KiB)]
    t.abdicate()
    assert list(t.active.runs()) == [(512 * KiB, 576 * KiB)]
    assert t.frozen is None


def test_freeze_reclaim_loses_no_bit() -> None:
    t = TrackedBitmap(DirtyBitmap(MiB, 64 * KiB))
    t.active.mark(0, 1)
    t.freeze()
    t.active.mark(512 * KiB, 1)
    assert t.pending().count() == 2
    t.reclaim()
    assert list(t.active.runs()) == [(0, 64 * KiB), (512 * KiB, 576 * KiB)]
    with pytest.raises(RuntimeError):
        t.reclaim()
    t.freeze()
    with pytest.raises(RuntimeError):
        t.freeze()


def test_persistence_round_trip_and_flags(tmp_path: Path) -> None:
    path = str(tmp_path / "b.bitmap")
    b = DirtyBitmap(1 << 40, 64 * KiB)  # 1 TiB: 16 Mi bits
    b.mark(0, 1)
    b.mark(500 * (1 << 30), 10 * MiB)
    ident = SourceIdentity(1 << 40, 123, 456, 789)
    save_bitmap(path, b, ident, in_use=True, trusted=False)
    assert os.path.getsize(path) < 4096  # sparse bitmaps stay small (sc encoding)
    stored = load_bitmap(path)
    assert stored.in_use and not stored.trusted and stored.identity == ident
    assert list(stored.bitmap.runs()) == list(b.runs())
    assert not os.path.exists(path + ".tmp")
    assert stored.reason is None


def test_an_untrusted_bitmap_keeps_its_reason(tmp_path: Path) -> None:
    """`status` after a remount says why the next backup will scan, not
    only that it will; a trusted bitmap carries no reason, and a file from
    before reasons were kept still reads."""
    path = str(tmp_path / "b.bitmap")
    b = DirtyBitmap(MiB, 64 * KiB)
    b.mark(0, 1)
    ident = SourceIdentity(MiB, 1, 2, 3)
    save_bitmap(path, b, ident, in_use=False, trusted=False, reason="its source was overwritten by a restöre")
    stored = load_bitmap(path)
    assert stored.reason == "its source was overwritten by a restöre" and not stored.trusted
    assert list(stored.bitmap.runs()) == list(b.runs())
    save_bitmap(path, b, ident, in_use=False, trusted=True, reason="stale")
    assert load_bitmap(path).reason is None
    save_bitmap(path, b, ident, in_use=False, trusted=False, reason="x" * 5000)
    assert load_bitmap(path).reason == "x" * 512  # bounded
    import struct
    import xxhash
    from bitarray.util import sc_encode
    payload = sc_encode(b.bits)  # the layout without a reason, as older versions wrote it
    body = struct.pack("<8sIIQQqQQQ", b"BFSBITM1", 2, 64 * KiB, MiB, MiB, 1, 2, 3, len(payload)) + payload
    with open(path, "wb") as f:
        f.write(body + xxhash.xxh3_64_digest(body))
    old = load_bitmap(path)
    assert old.reason is None and not old.trusted and list(old.bitmap.runs()) == list(b.runs())


def test_damaged_bitmap_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.bitmap"
    b = DirtyBitmap(MiB, 64 * KiB)
    b.mark(0, MiB)
    save_bitmap(str(path), b, SourceIdentity(MiB, 0, 0, 0), in_use=False)
    raw = bytearray(path.read_bytes())
    raw[-12] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BitmapFileError, match="checksum"):
        load_bitmap(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(BitmapFileError, match="not a backupfs bitmap"):
        load_bitmap(str(path))


def test_the_bitmap_file_lists_the_first_runs_and_counts_the_rest(tmp_path: Path) -> None:
    """`cat MOUNT/dev/bitmap` of a fragmented bitmap: exact totals, a bounded listing."""
    from backupfs.status import render_bitmap
    from engine.repo import Repository

    source = tmp_path / "src.img"
    source.write_bytes(bytes(8 * MiB))
    Repository.init(str(tmp_path / "repo"))
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        repo.add_device("d", str(source), 4 * KiB)
        dev = repo.device("d")
        starts = [i * 3 * 4 * KiB for i in range(600)]  # 600 one-granule runs
        for start in starts:
            dev.write(start, b"x")
        dev.write(8 * MiB - 4 * KiB, b"y" * 4 * KiB)  # the last granule: one more run
        text = render_bitmap(dev)
    finally:
        repo.close()
    runs = len(starts) + 1
    assert f"since last backup: {runs * 4 * KiB} bytes dirty in {runs} runs, trusted" in text
    assert f"since last full: {runs * 4 * KiB} bytes dirty in {runs} runs, trusted" in text
    listed = text.split("runs since last backup (start length):\n")[1].splitlines()
    assert listed[:20] == [f"  {s} {4 * KiB}" for s in starts[:20]]
    assert listed[20:] == [f"  ... {runs - 20} more"]
