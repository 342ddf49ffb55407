"""Checksum records: the file format, the lineage overlay, and what they cost in memory.

Opening a backup reads its whole lineage's records; a chain of a big device
may be 64 deep. A loaded record must cost what it defines, not what the
device is, and the overlay must hold one record at a time.
"""

from __future__ import annotations

import errno
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyfuse3
import pytest
from bitarray import bitarray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checksums import ChecksumError, ChecksumRecord, overlay, set_bits, zero_hash
from engine.repo import Repository

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _sparse_record(size: int, granularity: int, share: float, seed: int) -> ChecksumRecord:
    """A record defining about ``share`` of the granules, in scattered runs."""
    rng = np.random.default_rng(seed)
    rec = ChecksumRecord(size, granularity)
    n = rec.count
    firsts = np.sort(rng.choice(n, max(1, int(n * share / 4)), replace=False))
    for first in firsts:
        run = int(min(4, n - first))
        rec.set(int(first), [int(v) for v in rng.integers(1, 2**63, run, dtype=np.uint64)])
    return rec


def _model(records: list[ChecksumRecord]) -> dict[int, int]:
    out: dict[int, int] = {}
    for rec in records:
        for k in range(rec.count):
            if rec.defined[k]:
                out[k] = int(rec.hashes[k])
    return out


def test_round_trip_keeps_values_and_format(tmp_path: Path) -> None:
    size = 10 * MiB + 5 * KiB  # a short last granule
    rec = _sparse_record(size, 64 * KiB, 0.3, 1)
    rec.set_zero(rec.count - 3, 3)
    path = str(tmp_path / "r.sums")
    rec.save(path)
    loaded = ChecksumRecord.load(path)
    assert loaded.defined == rec.defined
    assert np.array_equal(loaded.packed(), rec.hashes[np.flatnonzero(np.array(rec.defined.tolist()))])
    assert np.array_equal(loaded.hashes, rec.hashes)
    assert loaded.hashes[-1] == zero_hash(size % (64 * KiB))
    assert loaded.encode() == rec.encode()  # the file format is unchanged by loading


def test_set_bits_found_at_every_position() -> None:
    rng = random.Random(3)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000):
        for _ in range(20):
            bits = bitarray(n, endian="little")
            bits.setall(0)
            for i in range(n):
                if rng.random() < 0.3:
                    bits[i] = 1
            assert set_bits(bits).tolist() == [i for i in range(n) if bits[i]]


def test_overlay_is_newest_wins(tmp_path: Path) -> None:
    size = 4 * MiB
    records = [_sparse_record(size, 4 * KiB, 1.0 if i == 0 else 0.2, i) for i in range(6)]
    records[0].defined[5] = 0  # a granule the full does not know, nor anyone after
    for i, rec in enumerate(records):
        rec.save(str(tmp_path / f"{i}.sums"))
    expected = _model(records)
    loaded = (ChecksumRecord.load(str(tmp_path / f"{i}.sums")) for i in range(len(records)))
    hashes, defined = overlay(loaded)
    assert {k: int(hashes[k]) for k in range(len(defined)) if defined[k]} == expected
    assert not defined[5] or 5 in expected


def test_overlay_refuses_records_of_different_sizes(tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="different device sizes"):
        overlay([_sparse_record(MiB, 4 * KiB, 0.5, 1), _sparse_record(2 * MiB, 4 * KiB, 0.5, 2)])


def test_opening_a_deep_lineage_of_a_big_device_costs_about_one_dense_array(tmp_path: Path) -> None:
    """64 GiB at 64 KiB: 1 Mi granules, 8 MiB as a dense array; 24 layers.

    Loaded dense, as before, every record cost 8 MiB and all were held at
    once (over 190 MiB here, 8 GiB for 1 TiB at depth 64); now the result,
    the full's values (which become the result) and one sparse record.
    """
    size, g, depth = 64 * GiB, 64 * KiB, 24
    dense = (size // g) * 8
    full = ChecksumRecord(size, g)
    full.set(0, [int(v) for v in np.random.default_rng(0).integers(1, 2**63, full.count, dtype=np.uint64)])
    paths = [str(tmp_path / "000.sums")]
    full.save(paths[0])
    del full
    for i in range(1, depth):
        paths.append(str(tmp_path / f"{i:03d}.sums"))
        _sparse_record(size, g, 0.02, i).save(paths[-1])

    one = ChecksumRecord.load(paths[1])
    assert one.memory_bytes() < dense / 10  # ~2% defined: values plus the bitmap

    def lineage() -> Iterator[ChecksumRecord]:
        return (ChecksumRecord.load(p) for p in paths)

    tracemalloc.start()
    try:
        hashes, defined = overlay(lineage())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert defined.all()
    assert peak < 2.5 * dense, f"overlay peaked at {peak / MiB:.0f} MiB for an {dense / MiB:.0f} MiB result"
    expected = ChecksumRecord.load(paths[0]).hashes
    for p in paths[1:]:
        rec = ChecksumRecord.load(p)
        idx = set_bits(rec.defined)
        expected[idx] = rec.packed()
    assert np.array_equal(hashes, expected)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "count", "bits", "granularity", "huge size", "huge bitmap"],
)
def test_damaged_record_is_refused(tmp_path: Path, damage: str) -> None:
    import struct

    import xxhash

    path = tmp_path / "r.sums"
    _sparse_record(8 * MiB, 64 * KiB, 0.5, 1).save(str(path))
    data = bytearray(path.read_bytes())
    body = data[:-8]
    if damage == "truncated":
        body = body[:-8]
    elif damage == "count":
        struct.pack_into("<Q", body, 20, struct.unpack_from("<Q", body, 20)[0] + 1)  # the defined count
    elif damage == "bits":
        body[44] ^= 0xFF
    elif damage == "granularity":
        struct.pack_into("<I", body, 8, 0)  # would divide by zero
    elif damage == "huge size":
        struct.pack_into("<Q", body, 12, 1 << 62)  # a bitmap of 2^46 granules
    else:
        # The bitmap's own header claims 2^39 bits: refused before decoding allocates them.
        blen = struct.unpack_from("<Q", body, 28)[0]
        fake = bytes([0x05]) + (1 << 39).to_bytes(5, "little") + bytes(blen - 6)
        body[36 : 36 + blen] = fake
    # A consistent digest: the checks behind it must catch the damage.
    path.write_bytes(bytes(body) + xxhash.xxh3_64_digest(bytes(body)))
    with pytest.raises(ChecksumError, match="r.sums"):
        ChecksumRecord.load(str(path))


def test_idle_backup_views_are_bounded_by_memory(repo: Repository, tmp_path: Path) -> None:
    """The mount keeps recently read backups open, within a memory budget."""
    from backupfs.views import ViewCache

    src = tmp_path / "src.img"
    src.write_bytes(random.Random(1).randbytes(4 * MiB))
    repo.add_device("d", str(src), 4 * KiB)
    recs = [repo.backup("d", "full").record for _ in range(3)]
    one = repo.open_backup(recs[0].id)
    per_view = one.memory_bytes()
    one.close()
    assert per_view >= (4 * MiB // (4 * KiB)) * 8  # the checksums at least

    for budget, kept in ((10 * per_view, 3), (int(1.5 * per_view), 1), (0, 1)):
        views = ViewCache(repo, idle_view_bytes=budget)
        for rec in recs:
            views.acquire(rec)
            views.release(rec.id)
        assert views.idle() == [r.id for r in recs][-kept:], budget
        views.close_all()


def _reseal(body: bytes) -> bytes:
    import xxhash

    return body + xxhash.xxh3_64_digest(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 40),
)
def test_a_mangled_defined_bitmap_is_refused_or_read_whole(tmp_path: Path, edits: list[tuple[int, int]],
                                                          cut: int) -> None:
    """Any bytes in the record's bitmap (with a digest that matches them):
    ChecksumError, or a record of the right size whose count agrees; never
    another exception, never a bitmap sized by the damage."""
    import struct

    path = tmp_path / "m.sums"
    rec = _sparse_record(4 * MiB, 4 * KiB, 0.3, 7)
    granules = rec.count
    body = bytearray(rec.encode()[:-8])
    blen = struct.unpack_from("<Q", body, 28)[0]
    bitmap = bytearray(body[36 : 36 + blen])
    for pos, value in edits:
        bitmap[pos % len(bitmap)] = value
    if cut:
        bitmap = bitmap[: max(0, len(bitmap) - cut)]
    struct.pack_into("<Q", body, 28, len(bitmap))
    body[36 : 36 + blen] = bitmap
    path.write_bytes(_reseal(bytes(body)))
    try:
        loaded = ChecksumRecord.load(str(path))
    except ChecksumError as e:
        assert "m.sums" in str(e)
        return
    assert len(loaded.defined) == granules
    assert loaded.defined.count(1) == len(loaded.packed())


def test_a_view_in_use_during_a_prune_is_closed_when_its_use_ends(repo: Repository, tmp_path: Path) -> None:
    """A reader gone while its read-ahead advice still waits keeps the view
    in use; a prune then removes its image. When the advice has run, the
    view must be closed (its deleted image let go), not kept idle for the
    next open. Also: two views of one backup opened in a race do not leak."""
    import threading

    from backupfs.fs import BackupOperations, Handle
    from backupfs.tree import BACKUP

    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(8 * MiB))
    repo.add_device("d", str(src), 64 * KiB)
    old, new = (repo.backup("d", "full").record for _ in range(2))
    ops = BackupOperations(repo)
    try:
        running, gate = threading.Event(), threading.Event()
        ops._advisor.submit(lambda: (running.set(), gate.wait(30)))  # a slow advice ahead
        assert running.wait(30)
        view = ops.views.acquire(old)
        ops._advise(Handle(ops.inodes.get(BACKUP, "d", old.id), view=view), 0, 16 * MiB)
        ops.views.release(old.id)  # the reader is gone; its advice is not
        repo.prune("d", remove=old.id)
        ops.views.drop_stale()  # what a prune through the mount does after it
        done = threading.Event()
        ops._advisor.submit(done.set)
        gate.set()
        assert done.wait(30)
        assert old.id not in ops.views.idle() and old.id not in ops.views.in_use()
        assert all(layer.fd < 0 for layer in getattr(view, "view", view).layers), "deleted image kept open"

        # Two opens of one backup that raced both end up idle: one is closed.
        first = repo.open_backup(new.id)
        ops.views.publish(new.id, first)
        ops.views.release(new.id)
        ops.views.publish(new.id, repo.open_backup(new.id))  # the slower opener registers after
        ops.views.release(new.id)
        assert all(layer.fd < 0 for layer in getattr(first, "view", first).layers)
    finally:
        ops.close_views()


def test_looking_up_a_backup_does_not_list_them_all(repo: Repository, tmp_path: Path) -> None:
    """`ls -l` of 3,000 backups took 8-12 s: every lookup of one name listed
    the whole directory. A lookup reads one row; it finds what a listing
    shows, and nothing else (another device's backup, a bad name)."""
    import trio

    from backupfs.fs import BackupOperations
    from backupfs.tree import BACKUPS, ROOT

    src = tmp_path / "src.img"
    src.write_bytes(random.Random(3).randbytes(1 * MiB))
    repo.add_device("d", str(src), 64 * KiB)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 * MiB))
    repo.add_device("e", str(other), 64 * KiB)
    ids = [repo.backup("d", "full").record.id for _ in range(3)]
    elsewhere = repo.backup("e", "full").record.id
    ops = BackupOperations(repo)
    try:
        listed: list[str] = []
        plain = repo.backups

        def counting(name: str | None = None) -> list:
            listed.append(name or "")
            return plain(name)

        repo.backups = counting  # type: ignore[method-assign]
        backups_dir = ops.inodes.get(BACKUPS, "d")

        async def lookups() -> None:
            for i in ids:
                attrs = await ops.lookup(backups_dir.inode, i.encode(), None)
                assert attrs.st_size == 1 * MiB
            link = await ops.lookup(backups_dir.inode, b"latest", None)
            assert link.st_size == len(ids[-1])
            for bad in (b"nope", b"\xff", ids[0].encode() + b"x", elsewhere.encode()):
                try:
                    await ops.lookup(backups_dir.inode, bad, None)
                except pyfuse3.FUSEError as e:
                    assert e.errno == errno.ENOENT
                else:
                    raise AssertionError(f"{bad!r} was found")

        trio.run(lookups)
        assert listed == []

        async def timeouts() -> None:
            # The tree is fixed while mounted: the kernel keeps its names
            # (a path walk asked for MOUNT/d and MOUNT/d/backups each time).
            root = ops.inodes.get(ROOT)
            devdir = await ops.lookup(root.inode, b"d", None)
            assert devdir.entry_timeout > 0 and devdir.attr_timeout > 0
            for name in (b"backups", b"snapshot", b"device", b"chain", b"bitmap"):
                entry = await ops.lookup(devdir.st_ino, name, None)
                assert entry.entry_timeout > 0, name
                # Only directories keep their attributes: the snapshot's size changes.
                assert (entry.attr_timeout > 0) == (name == b"backups"), name
            latest = await ops.lookup(backups_dir.inode, b"latest", None)
            assert latest.entry_timeout == 0  # it moves, and is gone with the last backup

        trio.run(timeouts)
    finally:
        ops.close_views()
