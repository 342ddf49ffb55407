"""The backup engine end to end, without FUSE: every backup checked by QEMU.

Each backup must `qemu-img compare` identical to a copy of the source taken
at the instant the backup was triggered, and pass `qemu-img check`.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.catalog import BackupRecord
from engine.device import Device
from engine.errors import BackupfsError, UsageError
from engine.job import JobError, Progress, Source
from engine.repo import JobBusy, Repository
from engine.units import MIN_RATE

from tests.oracle import qemu_check, qemu_compare, qemu_img, qemu_map

KiB = 1024
MiB = 1024 * KiB


# -- fixtures and helpers ----------------------------------------------------------------


def write_patterns(path: Path, patterns: list[tuple[int, int, int]]) -> None:
    with open(path, "r+b") as f:
        for byte, off, n in patterns:
            f.seek(off)
            f.write(bytes([byte]) * n)


def make_source(path: Path, size: int, seed: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if seed is not None:
            rng = random.Random(seed)
            for _ in range(40):
                off = rng.randrange(0, size - 256 * KiB) // 512 * 512
                f.seek(off)
                f.write(rng.randbytes(rng.randrange(512, 256 * KiB)))
    return path


class Snapshots:
    """Copies of the source taken at trigger instants."""

    def __init__(self, src: Path, where: Path) -> None:
        self.src = src
        self.where = where
        self.n = 0

    def take(self) -> Path:
        self.n += 1
        out = self.where / f"snap{self.n}.raw"
        subprocess.run(["cp", "--sparse=always", str(self.src), str(out)], check=True)
        return out


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    Repository.init(str(path))
    return path


@pytest.fixture
def repo(repo_dir: Path) -> Iterator[Repository]:
    r = Repository.open(str(repo_dir))
    try:
        yield r
    finally:
        r.close()


def assert_equals_snapshot(repo: Repository, rec: BackupRecord, snap: Path) -> None:
    image = repo.image_path(rec)
    qemu_check(image)
    qemu_compare(image, snap)


def visible_images(repo: Repository, name: str) -> list[str]:
    d = Path(repo.path) / "devices" / name
    return sorted(p.name for p in d.iterdir() if p.suffix == ".qcow2")


class HookedSource(Source):
    """The real source, with a hook before each read of the job's main thread."""

    def __init__(self, dev: Device, hook: Callable[[int, int, int], None]) -> None:
        super().__init__(dev.fd, dev.path, dev.size)
        self.hook = hook
        self.reads = 0
        self.main = threading.get_ident()

    def read(self, offset: int, length: int) -> bytearray:
        if threading.get_ident() == self.main:
            self.reads += 1
            self.hook(self.reads, offset, length)
        return super().read(offset, length)


# -- the aligned copy -----------------------------------------------------------------------


def test_seed_case_whole_target_cluster(repo: Repository, tmp_path: Path) -> None:
    """64 KiB bitmap, 128 KiB clusters, 100 bytes changed in a cluster's second half."""
    src = make_source(tmp_path / "src.img", 16 * MiB, seed=1)
    repo.add_device("vm1", str(src), 64 * KiB)
    snaps = Snapshots(src, tmp_path)
    full = repo.backup("vm1", "full").record
    dev = repo.device("vm1")
    dev.write(3 * 128 * KiB + 64 * KiB + 1000, b"\xaa" * 100)
    snap = snaps.take()
    inc = repo.backup("vm1", "incremental", cluster_size=128 * KiB).record
    assert inc.stored_bytes == 128 * KiB
    assert_equals_snapshot(repo, inc, snap)
    image = repo.image_path(inc)
    extents = [e for e in qemu_map(image) if e["depth"] == 0 and e["present"]]
    assert [(e["start"], e["length"]) for e in extents] == [(3 * 128 * KiB, 128 * KiB)]
    # Without its backing file the cluster still reads whole and right.
    qemu_img("rebase", "-u", "-b", "", image)
    alone_map = qemu_map(image)
    assert all(e["start"] % (128 * KiB) == 0 and e["length"] % (128 * KiB) == 0 for e in alone_map)
    assert [(e["start"], e["length"]) for e in alone_map if e["data"]] == [(3 * 128 * KiB, 128 * KiB)]
    alone = tmp_path / "alone.raw"
    qemu_img("convert", "-O", "raw", image, str(alone))
    with open(alone, "rb") as a, open(snap, "rb") as s:
        a.seek(3 * 128 * KiB)
        s.seek(3 * 128 * KiB)
        assert a.read(128 * KiB) == s.read(128 * KiB)
    qemu_img("rebase", "-u", "-b", f"{full.id}.qcow2", "-F", "qcow2", image)
    assert_equals_snapshot(repo, inc, snap)


IOTEST_124_ROUNDS = [
    [(0xAB, 0, 512), (0xFE, 16 * MiB, 256 * KiB), (0x64, 32736 * KiB, 64 * KiB)],
    [(0x9A, 0, 512), (0x55, 8 * MiB, 352 * KiB), (0x78, 15872 * KiB, 1 * MiB)],
]


@pytest.mark.parametrize("granularity", [32 * KiB, 64 * KiB, 128 * KiB])
@pytest.mark.parametrize("cluster", [64 * KiB, 128 * KiB, 1 * MiB])
def test_iotest_124_patterns(granularity: int, cluster: int, repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 64 * MiB)
    write_patterns(src, [(0x41, 0, 512), (0xD5, 1 * MiB, 32 * KiB), (0xDC, 32 * MiB, 124 * KiB)])
    repo.add_device("d", str(src), granularity)
    snaps = Snapshots(src, tmp_path)
    dev = repo.device("d")
    checks = [(repo.backup("d", "full", cluster_size=cluster).record, snaps.take())]
    hollow = repo.backup("d", "incremental", cluster_size=cluster, allow_empty=True)
    assert hollow.record.stored_bytes == 0 and hollow.bytes_total == 0
    checks.append((hollow.record, snaps.take()))
    for round_ in IOTEST_124_ROUNDS:
        for byte, off, n in round_:
            dev.write(off, bytes([byte]) * n)
        rec = repo.backup("d", "incremental", cluster_size=cluster).record
        checks.append((rec, snaps.take()))
        unit = max(granularity, cluster)
        touched = {o // unit for _, off, n in round_ for o in range(off, off + n, 512)}
        own = [e for e in qemu_map(repo.image_path(rec)) if e["depth"] == 0 and e["present"]]
        assert sum(e["length"] for e in own) == len(touched) * unit
        assert {e["start"] // unit for e in own} <= touched
    for rec, snap in checks:
        assert_equals_snapshot(repo, rec, snap)


def test_zeroed_region_reads_zeros(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 8 * MiB)
    write_patterns(src, [(0x11, 0, 8 * MiB)])
    repo.add_device("z", str(src))
    repo.backup("z", "full")
    repo.device("z").write(2 * MiB, bytes(1 * MiB))
    snap = Snapshots(src, tmp_path).take()
    inc = repo.backup("z", "incremental").record
    assert_equals_snapshot(repo, inc, snap)
    zeros = [e for e in qemu_map(repo.image_path(inc)) if e["depth"] == 0 and e["zero"]]
    assert [(e["start"], e["length"], e["present"]) for e in zeros] == [(2 * MiB, 1 * MiB, True)]
    assert inc.stored_bytes == 0


def test_stored_bytes_end_at_the_device_end(repo: Repository, tmp_path: Path) -> None:
    """A disk of 16 MiB + 4 KiB: the job said 16781312 bytes stored, list
    and the xattr 16842752 (the last cluster's padding past the end)."""
    size = 16 * MiB + 4 * KiB
    src = make_source(tmp_path / "src.img", size)
    write_patterns(src, [(0x31, 0, 1 * MiB), (0x32, 16 * MiB, 4 * KiB)])
    repo.add_device("t", str(src))
    res = repo.backup("t", "full")
    assert res.record.stored_bytes == res.bytes_written == 1 * MiB + 4 * KiB
    repo.device("t").write(16 * MiB, b"\x33" * (4 * KiB))
    res = repo.backup("t", "incremental")
    assert res.record.stored_bytes == res.bytes_written == 4 * KiB
    qemu_check(repo.image_path(res.record))
    assert repo.catalog.jobs("t")[0].bytes_written == 4 * KiB


def test_a_chain_never_grows_past_what_can_be_read(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1001st backup of a chain "succeeded" and could then not be read,
    restored or verified: no reader follows more than 1000 images. At the
    limit an incremental is refused (EINVAL through the trigger), or, with
    auto_full, a full starts a new chain. The limit is lowered to 4 here;
    it is the reader's own constant."""
    import engine.backuprun
    from engine.qcow2 import format as qcow2_format

    assert engine.backuprun.MAX_CHAIN_DEPTH == qcow2_format.MAX_CHAIN_DEPTH == 1000
    monkeypatch.setattr(engine.backuprun, "MAX_CHAIN_DEPTH", 4)
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=5)
    repo.add_device("c", str(src))
    repo.backup("c", "full")
    dev = repo.device("c")
    for i in range(3):
        dev.write(i * 64 * KiB, b"\x44" * 4096)
        repo.backup("c", "incremental")
    dev.write(1 * MiB, b"\x45" * 4096)
    before = [b.id for b in repo.backups("c")]
    with pytest.raises(UsageError, match="would be backup 5 of its chain, and a chain reads through at most 4"):
        repo.backup("c", "incremental")
    assert [b.id for b in repo.backups("c")] == before
    res = repo.backup("c", "incremental", auto_full=True)
    assert res.record.kind == "full" and res.record.parent is None
    assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())
    dev.write(2 * MiB, b"\x46" * 4096)
    res = repo.backup("c", "incremental")  # on the new full: the chain starts again
    assert res.record.parent == repo.backups("c")[-2].id
    assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())


def test_a_full_of_a_sparse_source_reads_only_its_data(repo: Repository, tmp_path: Path) -> None:
    """A full backup of a thin 4 TiB image holding 8 MiB read all 4 TiB of
    holes (45 minutes). The holes are asked of the file system (SEEK_DATA)
    and not read; the backup, its checksums and a later scan are the same."""
    size = 1 << 30
    src = make_source(tmp_path / "src.img", size)
    write_patterns(src, [(0x51, 3 * MiB, 2 * MiB), (0x52, 700 * MiB + 4 * KiB, 100 * KiB), (0x53, size - 64 * KiB, 64 * KiB)])
    repo.add_device("s", str(src))
    dev = repo.device("s")
    dev.write(500 * MiB, b"\x54" * (64 * KiB))  # just written: maybe only in the page cache
    read: list[int] = []

    class Counting(Source):
        def read(self, offset: int, length: int) -> bytes:
            read.append(length)
            return super().read(offset, length)

    def counting(d: Device) -> Source:
        return Counting(d.fd, d.path, d.size)

    full = repo.backup("s", "full", source_factory=counting).record
    assert sum(read) <= 4 * 8 * MiB, sum(read)  # the four 8 MiB chunks with data, of 128
    qemu_compare(repo.image_path(full), src)
    qemu_check(repo.image_path(full))
    assert repo.verify("s").ok
    # A scan after it (the bitmap distrusted) compares the recorded checksums
    # of the holes too, and finds nothing changed but the new write.
    dev.write(900 * MiB, b"\x55" * 4096)
    read.clear()
    inc = repo.backup("s", "incremental", scan=True, source_factory=counting)
    assert inc.scanned and inc.record.stored_bytes == 64 * KiB and sum(read) <= 5 * 8 * MiB
    qemu_compare(repo.image_path(inc.record), src)


def test_a_hole_is_only_what_the_file_holds_as_one(tmp_path: Path) -> None:
    """Past the end of a source that shrank there is no hole to read as
    zeros: the read must fail there, as it did before holes were skipped."""
    path = tmp_path / "thin.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(1 * MiB)
        f.write(b"\x01" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        src = Source(fd, str(path), 8 * MiB)  # registered at 8 MiB, now 4
        assert src.hole(0, 1 * MiB) and src.hole(2 * MiB, 2 * MiB)
        assert not src.hole(1 * MiB - 4096, 64 * KiB)
        assert not src.hole(3 * MiB, 2 * MiB) and not src.hole(5 * MiB, 64 * KiB)
        with pytest.raises(JobError, match="did it shrink"):
            src.read(5 * MiB, 64 * KiB)
    finally:
        os.close(fd)


def test_full_stores_no_zero_regions(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 32 * MiB)
    write_patterns(src, [(0x22, 1 * MiB, 3 * MiB), (0x23, 20 * MiB, 64 * KiB)])
    repo.add_device("f", str(src))
    full = repo.backup("f", "full").record
    assert full.stored_bytes == 3 * MiB + 64 * KiB
    data = [(e["start"], e["length"]) for e in qemu_map(repo.image_path(full)) if e["data"]]
    assert data == [(1 * MiB, 3 * MiB), (20 * MiB, 64 * KiB)]
    qemu_compare(repo.image_path(full), src)


def test_differential_copies_everything_since_the_full(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 16 * MiB, seed=3)
    repo.add_device("v", str(src))
    snaps = Snapshots(src, tmp_path)
    dev = repo.device("v")
    full = repo.backup("v", "full").record
    dev.write(1 * MiB, b"\x01" * 4096)
    inc = repo.backup("v", "incremental").record
    dev.write(5 * MiB, b"\x02" * 4096)
    snap_d1 = snaps.take()
    d1 = repo.backup("v", "differential").record
    assert d1.parent == full.id and inc.parent == full.id
    assert d1.stored_bytes == 2 * 64 * KiB  # both changes since the full
    assert_equals_snapshot(repo, d1, snap_d1)
    dev.write(9 * MiB, b"\x03" * 4096)
    snap_d2 = snaps.take()
    d2 = repo.backup("v", "differential").record
    assert d2.parent == full.id and d2.stored_bytes == 3 * 64 * KiB
    assert_equals_snapshot(repo, d2, snap_d2)
    dev.write(12 * MiB, b"\x04" * 4096)
    snap_i = snaps.take()
    i2 = repo.backup("v", "incremental").record
    assert i2.parent == d2.id and i2.stored_bytes == 64 * KiB
    assert_equals_snapshot(repo, i2, snap_i)


def test_incremental_needs_a_full(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=4)
    repo.add_device("n", str(src))
    with pytest.raises(UsageError, match="no full backup"):
        repo.backup("n", "incremental")
    assert repo.backups("n") == []
    res = repo.backup("n", "incremental", auto_full=True)
    assert res.record.kind == "full" and res.record.id.endswith("-0001-full")


def test_a_rate_below_the_minimum_is_refused_before_any_work(repo: Repository, tmp_path: Path) -> None:
    """The engine keeps the rule itself: a caller past the trigger and the CLI
    (a library user, a future command) cannot start a crawling backup."""
    src = make_source(tmp_path / "src.img", 64 * KiB)
    repo.add_device("r", str(src))
    for rate in (0, 1, MIN_RATE - 1):
        with pytest.raises(UsageError, match="rate must be at least 1M"):
            repo.backup("r", "full", rate=rate)
    assert repo.backups("r") == []
    assert repo.backup("r", "full", rate=MIN_RATE).record.kind == "full"


def test_ids_sort_by_time_within_one_second(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 1 * MiB, seed=5)
    repo.add_device("s", str(src))
    ids = [repo.backup("s", "full" if i == 0 else "incremental", allow_empty=True).record.id for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [i.split("-")[-1] for i in ids] == ["full"] + ["incremental"] * 4


# -- copy-before-write ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])  # each seed: three jobs, each written to before every read
def test_copy_before_write_deterministic(seed: int, repo: Repository, tmp_path: Path) -> None:
    """Before each main-loop read, another thread writes to clusters not yet
    copied (and some already copied): the backup is still the trigger-time disk."""
    size = 48 * MiB
    src = make_source(tmp_path / "src.img", size, seed=seed)
    repo.add_device("c", str(src), 64 * KiB)
    dev = repo.device("c")
    rng = random.Random(seed)
    kind_cluster = [("full", 64 * KiB), ("incremental", 128 * KiB), ("differential", 1 * MiB)]
    snaps = Snapshots(src, tmp_path)
    written_during: list[tuple[int, int]] = []

    def hook(n: int, offset: int, length: int) -> None:
        def writer() -> None:
            for _ in range(8):
                off = rng.randrange(0, size - 200 * KiB) // 512 * 512
                if offset <= off < offset + length or offset <= off + 200 * KiB < offset + length:
                    continue  # the main loop holds those clusters; writing there would wait on us
                n_bytes = rng.choice([512, 4096, 100 * KiB, 200 * KiB])
                dev.write(off, rng.randbytes(n_bytes))
                written_during.append((off, n_bytes))

        t = threading.Thread(target=writer)
        t.start()
        t.join()

    for kind, cluster in kind_cluster:
        for _ in range(6):  # dirty some clusters so incrementals have work
            off = rng.randrange(0, size - 64 * KiB)
            dev.write(off, rng.randbytes(rng.randrange(1, 64 * KiB)))
        snap = snaps.take()
        written_during.clear()
        res = repo.backup(
            "c", kind, cluster_size=cluster, source_factory=lambda d: HookedSource(d, hook)
        )
        assert written_during, "the hook wrote nothing"
        assert_equals_snapshot(repo, res.record, snap)
        if kind == "full":
            assert res.cbw_units > 0
    # Nothing written during the jobs was lost: the next incremental has it all.
    final = repo.backup("c", "incremental").record
    assert_equals_snapshot(repo, final, snaps.take())


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_copy_before_write_free_running_writer(seed: int, repo: Repository, tmp_path: Path) -> None:
    size = 64 * MiB
    src = make_source(tmp_path / "src.img", size, seed=seed)
    repo.add_device("w", str(src), 64 * KiB)
    dev = repo.device("w")
    snaps = Snapshots(src, tmp_path)
    for cluster in (64 * KiB, 256 * KiB):
        started = threading.Event()
        stop = threading.Event()
        rng = random.Random(seed * cluster)
        count = [0]

        def writer() -> None:
            started.wait()
            while not stop.is_set():
                off = rng.randrange(0, size - 64 * KiB) // 512 * 512
                dev.write(off, rng.randbytes(rng.choice([512, 8 * KiB, 64 * KiB])))
                count[0] += 1

        def on_first_read(n: int, offset: int, length: int) -> None:
            started.set()

        snap = snaps.take()
        t = threading.Thread(target=writer)
        t.start()
        try:
            kind = "full" if cluster == 64 * KiB else "incremental"
            res = repo.backup("w", kind, cluster_size=cluster,
                              source_factory=lambda d: HookedSource(d, on_first_read))
        finally:
            started.set()
            stop.set()
            t.join()
        assert count[0] > 0
        assert_equals_snapshot(repo, res.record, snap)
    final = repo.backup("w", "incremental").record
    assert_equals_snapshot(repo, final, snaps.take())


# -- failures ----------------------------------------------------------------------------------


def _state_after_failure(repo: Repository, name: str, before_images: list[str]) -> None:
    assert visible_images(repo, name) == before_images
    d = Path(repo.path) / "devices" / name
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-") or p.suffix == ".sums" and
                p.with_suffix(".qcow2").name not in before_images]
    assert repo.running_job(name) is None


def test_source_read_error_keeps_the_bitmap(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 32 * MiB, seed=6)
    repo.add_device("e", str(src), 64 * KiB)
    dev = repo.device("e")
    repo.backup("e", "full")
    for off in (0, 10 * MiB, 20 * MiB, 30 * MiB):
        dev.write(off, b"\x77" * 4096)
    before = visible_images(repo, "e")
    dirty_before = list(dev.since_last.active.runs())

    def fail_third(n: int, offset: int, length: int) -> None:
        if n == 2:
            dev.write(25 * MiB, b"\x78" * 512)  # a write during the failing job
        if n == 3:
            raise JobError(f"reading source at offset {offset}: Input/output error", errno.EIO)

    with pytest.raises(JobError) as info:
        repo.backup("e", "incremental", chunk_bytes=64 * KiB,
                    source_factory=lambda d: HookedSource(d, fail_third))
    assert info.value.errno == errno.EIO and "Input/output error" in str(info.value)
    _state_after_failure(repo, "e", before)
    runs = list(dev.since_last.active.runs())
    assert set(dirty_before) <= set(runs) and (25 * MiB, 25 * MiB + 64 * KiB) in runs
    jobs = repo.catalog.jobs("e", limit=1)
    assert jobs[0].state == "failed" and "Input/output error" in (jobs[0].error or "")
    snap = Snapshots(src, tmp_path).take()
    rec = repo.backup("e", "incremental").record
    assert rec.stored_bytes == 5 * 64 * KiB
    assert_equals_snapshot(repo, rec, snap)


def test_cancel_midway(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 32 * MiB, seed=7)
    repo.add_device("k", str(src), 64 * KiB)
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.done >= 4 * MiB:
            cancel.set()

    with pytest.raises(JobError) as info:
        repo.backup("k", "full", on_progress=on_progress, cancel=cancel, chunk_bytes=1 * MiB)
    assert info.value.errno == errno.ECANCELED
    _state_after_failure(repo, "k", [])
    assert repo.catalog.jobs("k", limit=1)[0].state == "cancelled"
    snap = Snapshots(src, tmp_path).take()
    assert_equals_snapshot(repo, repo.backup("k", "full").record, snap)


def test_second_trigger_is_busy(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 8 * MiB, seed=8)
    repo.add_device("b", str(src))
    seen: list[BackupfsError] = []

    def nested(n: int, offset: int, length: int) -> None:
        if n == 2:
            try:
                repo.backup("b", "full")
            except JobBusy as e:
                seen.append(e)

    repo.backup("b", "full", chunk_bytes=1 * MiB, source_factory=lambda d: HookedSource(d, nested))
    assert len(seen) == 1 and seen[0].errno == errno.EBUSY
    assert "already running" in str(seen[0]) and "bytes done" in str(seen[0])
    assert len(repo.backups("b")) == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a repository disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _room_numbers(message: str) -> tuple[int, int]:
    """(needed, free) from "... up to 40 MiB (41943040 bytes) and 23.9 MiB (25034752 bytes) were free"."""
    m = re.search(r"up to [^(]+\((\d+) bytes\) and [^(]+\((\d+) bytes\) were free", message)
    assert m, message
    return int(m.group(1)), int(m.group(2))


@pytest.mark.mount
def test_repository_disk_full(small_fs: Path, tmp_path: Path) -> None:
    repo_dir = small_fs / "repo"
    Repository.init(str(repo_dir))
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(40 * MiB))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("full", str(src))
        repo.device("full")  # opened (its bitmaps saved): what the backup finds
        files = sorted(os.listdir(repo_dir / "devices" / "full"))
        # Refused before anything is made, with both numbers.
        with pytest.raises(BackupfsError) as info:
            repo.backup("full", "full")
        assert info.value.errno == errno.ENOSPC and "does not fit on the repository's disk" in str(info.value)
        assert "--force" in str(info.value) and "\n" not in str(info.value)
        needed, free = _room_numbers(str(info.value))
        assert 40 * MiB < needed < 41 * MiB and 20 * MiB < free <= 24 * MiB
        assert sorted(os.listdir(repo_dir / "devices" / "full")) == files and repo.catalog.jobs("full") == []
        # Tried anyway: disk full, saying the same numbers.
        with pytest.raises(BackupfsError) as info:
            repo.backup("full", "full", force=True)
        assert info.value.errno == errno.ENOSPC and "disk full" in str(info.value)
        assert "the backup needed up to" in str(info.value) and "when it started" in str(info.value)
        assert _room_numbers(str(info.value)) == (needed, free)
        _state_after_failure(repo, "full", [])
        dev = repo.device("full")
        assert dev.since_last.frozen is None
    # The space is given back.
    assert shutil.disk_usage(small_fs).used < 1 * MiB


@pytest.mark.mount
def test_an_incremental_that_fills_the_disk_says_how_much(small_fs: Path, tmp_path: Path) -> None:
    repo_dir = small_fs / "repo"
    Repository.init(str(repo_dir))
    src = tmp_path / "src.img"
    with open(src, "wb") as f:  # 40 MiB, 4 MiB of it data: the full's bound is the data (SEEK_DATA)
        f.truncate(40 * MiB)
        f.write(os.urandom(4 * MiB))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("inc", str(src))
        full = repo.backup("inc", "full").record
        dev = repo.device("inc")
        dev.write(8 * MiB, os.urandom(30 * MiB))
        dirty = list(dev.since_last.active.runs())
        with pytest.raises(BackupfsError) as info:
            repo.backup("inc", "incremental")
        assert info.value.errno == errno.ENOSPC and "disk full" in str(info.value)
        needed, free = _room_numbers(str(info.value))
        assert 30 * MiB < needed < 31 * MiB and 10 * MiB < free < 21 * MiB
        _state_after_failure(repo, "inc", [f"{full.id}.qcow2"])
        assert list(dev.since_last.active.runs()) == dirty  # the bitmap kept


# -- untrusted bitmaps -------------------------------------------------------------------------


def test_source_changed_behind_our_back(repo_dir: Path, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 16 * MiB, seed=9)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("u", str(src))
        repo.backup("u", "full")
    write_patterns(src, [(0x5A, 7 * MiB + 3, 10)])  # not through backupfs
    snap = Snapshots(src, tmp_path).take()
    with Repository.open(str(repo_dir)) as repo:
        dev = repo.device("u")
        assert not dev.trusted and "behind" in (dev.untrusted_reason or "")
        res = repo.backup("u", "incremental")
        assert res.scanned and "untrusted" in (res.scan_reason or "")
        assert res.record.stored_bytes == 64 * KiB and res.record.scanned
        assert_equals_snapshot(repo, res.record, snap)
        assert dev.trusted
        dev.write(0, b"\x01")
        res = repo.backup("u", "incremental")
        assert not res.scanned and res.record.stored_bytes == 64 * KiB


def test_unclean_stop_makes_the_bitmap_untrusted(repo_dir: Path, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 16 * MiB, seed=10)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("x", str(src))
        repo.backup("x", "full")
    # A process writes through the engine and dies without closing.
    code = textwrap.dedent(f"""
        import os
        from engine.repo import Repository
        repo = Repository.open({str(repo_dir)!r})
        dev = repo.device("x")
        dev.write(3 * 1024 * 1024, b"\\x66" * 70000)
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    snap = Snapshots(src, tmp_path).take()
    with Repository.open(str(repo_dir)) as repo:
        dev = repo.device("x")
        assert not dev.trusted and "did not stop cleanly" in (dev.untrusted_reason or "")
        res = repo.backup("x", "differential")
        assert res.scanned and res.record.stored_bytes == 2 * 64 * KiB
        assert_equals_snapshot(repo, res.record, snap)
        # The scan repaired both bitmaps: the next differential needs no scan.
        assert dev.trusted
        dev.write(10 * MiB, b"\x01")
        res2 = repo.backup("x", "differential")
        assert not res2.scanned and res2.record.stored_bytes == 3 * 64 * KiB
        assert_equals_snapshot(repo, res2.record, Snapshots(src, tmp_path).take())


def test_explicit_scan_finds_only_real_changes(repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 16 * MiB, seed=11)
    repo.add_device("s", str(src))
    dev = repo.device("s")
    repo.backup("s", "full", cluster_size=128 * KiB)
    old = dev.read(4 * MiB, 4096)
    dev.write(4 * MiB, old)  # same bytes: dirty in the bitmap, unchanged in fact
    dev.write(9 * MiB, b"\x42" * 10)
    snap = Snapshots(src, tmp_path).take()
    res = repo.backup("s", "incremental", scan=True)
    assert res.scanned and res.scan_reason == "requested"
    assert res.record.stored_bytes == 64 * KiB
    assert_equals_snapshot(repo, res.record, snap)


# -- the repository --------------------------------------------------------------------------------


def test_second_process_gets_a_clear_lock_error(repo_dir: Path) -> None:
    with Repository.open(str(repo_dir)):
        code = f"from engine.repo import Repository\nRepository.open({str(repo_dir)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0
        assert f"is in use by pid {os.getpid()}" in proc.stderr


def test_newer_catalog_is_refused(repo_dir: Path) -> None:
    db = sqlite3.connect(repo_dir / "catalog.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(BackupfsError, match="newer than this backupfs"):
        Repository.open(str(repo_dir))


def test_leftovers_of_a_crash_are_removed(repo_dir: Path, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=12)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("l", str(src))
        keep = repo.backup("l", "full").record
        # What a job records before it makes its files (a crash then left them).
        names = [".tmp-20260101T000000Z-0009-full.qcow2", "20260101T000000Z-0009-full.qcow2",
                 "20260101T000000Z-0009-full.sums"]
        repo.catalog.record_intents("file", [f"devices/l/{n}" for n in names])
    d = repo_dir / "devices" / "l"
    (d / ".tmp-20260101T000000Z-0009-full.qcow2").write_bytes(b"\0" * 4096)
    (d / "20260101T000000Z-0009-full.qcow2").write_bytes(b"QFI\xfb")  # renamed, never committed
    (d / "20260101T000000Z-0009-full.sums").write_bytes(b"x")
    (d / "notes.sums").write_bytes(b"mine")  # not recorded: not ours to delete
    with Repository.open(str(repo_dir)) as repo:
        assert visible_images(repo, "l") == [f"{keep.id}.qcow2"]
        assert sorted(p.name for p in d.iterdir() if "0009" in p.name) == []
        assert (d / "notes.sums").exists()
        assert repo.catalog.intents() == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "sp ace"])
def test_device_names_cannot_escape(name: str, repo: Repository, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 1 * MiB)
    with pytest.raises(UsageError, match="invalid device name"):
        repo.add_device(name, str(src))


def test_device_sources_are_checked(repo: Repository, tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(UsageError, match="multiple of 512"):
        repo.add_device("odd", str(odd))
    with pytest.raises(UsageError, match="No such file"):
        repo.add_device("gone", str(tmp_path / "missing.img"))
    with pytest.raises(UsageError, match="not a regular file"):
        repo.add_device("dir", str(tmp_path))
    with pytest.raises(UsageError, match="inside the repository"):
        repo.add_device("inside", os.path.join(repo.path, "catalog.db"))


def test_source_that_shrank_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=13)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("sh", str(src))
        repo.backup("sh", "full")
    os.truncate(src, 2 * MiB)
    with Repository.open(str(repo_dir)) as repo:
        with pytest.raises(BackupfsError, match="changed size"):
            repo.backup("sh", "incremental")
        assert len(repo.backups("sh")) == 1



def test_two_devices_in_the_same_second_get_distinct_ids(repo: Repository, tmp_path: Path) -> None:
    """Timers fire together: every backup id stays unique across devices."""
    ids = []
    for name in ("a", "b", "c"):
        repo.add_device(name, str(make_source(tmp_path / f"{name}.img", 1 * MiB, seed=20)))
    for name in ("a", "b", "c"):
        ids.append(repo.backup(name, "full").record.id)
    for name in ("a", "b", "c"):
        ids.append(repo.backup(name, "incremental", allow_empty=True).record.id)
    assert len(set(ids)) == 6 and ids == sorted(ids)
    assert [len(repo.backups(n)) for n in ("a", "b", "c")] == [2, 2, 2]


# -- changes the bitmap cannot see ----------------------------------------------------------


def write_behind_our_back(src: Path, offset: int, data: bytes) -> None:
    """Another program writes the source file (a VM started on the image).

    Its time is then moved on by a millisecond if the write landed within
    the clock tick of the file's last change, which a coarse clock allows
    and which backupfs is documented not to see.
    """
    before = os.stat(src).st_mtime_ns
    with open(src, "r+b") as f:
        f.seek(offset)
        f.write(data)
    st = os.stat(src)
    if st.st_mtime_ns == before:
        os.utime(src, ns=(st.st_atime_ns, before + 1_000_000))


def test_another_programs_write_is_not_hidden_by_a_later_write_of_ours(repo: Repository, tmp_path: Path) -> None:
    """Our write moves the file's time too: looked at only at the next
    backup, the other program's write was hidden behind it."""
    src = make_source(tmp_path / "src.img", 8 * MiB, seed=30)
    repo.add_device("o", str(src))
    repo.backup("o", "full")
    dev = repo.device("o")
    write_behind_our_back(src, 5 * MiB, b"not through backupfs")
    dev.write(1 * MiB, b"through backupfs")
    res = repo.backup("o", "incremental")
    assert res.scanned and "written by another program" in (res.scan_reason or ""), res.scan_reason
    assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())
    dev.write(2 * MiB, b"ours alone")
    res = repo.backup("o", "incremental")
    assert not res.scanned and res.record.stored_bytes == 64 * KiB


def test_another_programs_write_is_not_hidden_by_a_clean_close(repo_dir: Path, tmp_path: Path) -> None:
    """A clean close saves the file's time as the one the next open trusts:
    the other program's write before it must be remembered as unseen."""
    src = make_source(tmp_path / "src.img", 8 * MiB, seed=31)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("c", str(src))
        repo.backup("c", "full")
        repo.device("c").write(1 * MiB, b"through backupfs")
        write_behind_our_back(src, 6 * MiB, b"not through backupfs")
    with Repository.open(str(repo_dir)) as repo:
        assert not repo.device("c").trusted
        res = repo.backup("c", "incremental")
        assert res.scanned
        assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())


def test_a_write_noticed_during_a_job_keeps_the_bitmap_untrusted(repo: Repository, tmp_path: Path) -> None:
    """The job that ends well re-trusts the bitmap only if nothing was
    noticed while it ran: here a write of ours, mid-copy, finds another
    program's write, which the next backup must scan for."""
    src = make_source(tmp_path / "src.img", 8 * MiB, seed=32)
    repo.add_device("j", str(src))
    repo.backup("j", "full")
    dev = repo.device("j")
    dev.write(0, b"dirty")

    def hook(n: int, offset: int, length: int) -> None:
        if n == 1:
            write_behind_our_back(src, 7 * MiB, b"not through backupfs")
            dev.write(3 * MiB, b"through backupfs")  # outside what the job copies

    res = repo.backup("j", "incremental", source_factory=lambda d: HookedSource(d, hook))
    assert not res.scanned
    assert not dev.trusted and "written by another program" in (dev.untrusted_reason or "")
    res = repo.backup("j", "incremental")
    assert res.scanned
    assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())


@pytest.mark.parametrize("removed", ["latest", "last full"])
def test_prune_while_the_source_is_away_leaves_the_bitmap_untrusted(
    removed: str, repo_dir: Path, tmp_path: Path
) -> None:
    """The LV is not active, the disk unplugged: the removal still has to
    tell the bitmap, or the next backup once the source is back misses what
    the removed backup held."""
    src = make_source(tmp_path / "src.img", 8 * MiB, seed=33)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("a", str(src))
        first = repo.backup("a", "full").record
        repo.device("a").write(3 * MiB, b"held by the removed backup")
        if removed == "latest":
            gone = repo.backup("a", "incremental").record
        else:
            repo.backup("a", "incremental")
            gone = repo.backup("a", "full").record  # the last full, no children
    os.rename(src, tmp_path / "away.img")
    with Repository.open(str(repo_dir)) as repo:
        with pytest.raises(BackupfsError, match="does not exist"):
            repo.device("a")
        assert [p.removed.id for p in repo.prune("a", remove=gone.id)] == [gone.id]
    os.rename(tmp_path / "away.img", src)
    with Repository.open(str(repo_dir)) as repo:
        kind = "incremental" if removed == "latest" else "differential"
        res = repo.backup("a", kind)
        assert res.scanned, res.scan_reason
        # Why, kept on disk across the remount, not a generic "untrusted".
        assert f"the {removed} backup was removed" in (res.scan_reason or "")
        if kind == "differential":
            assert res.record.parent == first.id
        assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())


def test_a_lost_device_directory_is_made_again(repo_dir: Path, tmp_path: Path) -> None:
    """An older version did not make a new device's directory durable: a
    power loss could keep the device and lose the directory its bitmaps and
    images live in."""
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=34)
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("l", str(src))
    os.rmdir(repo_dir / "devices" / "l")
    with Repository.open(str(repo_dir)) as repo:
        res = repo.backup("l", "full")
        assert_equals_snapshot(repo, res.record, Snapshots(src, tmp_path).take())


class _Stopped(KeyboardInterrupt):
    """What the CLI raises on SIGTERM and SIGHUP: a Ctrl-C with the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@pytest.mark.parametrize(("stop", "says"), [(_Stopped(15), "interrupted by SIGTERM"),
                                            (KeyboardInterrupt(), "interrupted (Ctrl-C)")])
def test_the_job_history_names_what_stopped_a_job(
    repo: Repository, tmp_path: Path, stop: KeyboardInterrupt, says: str
) -> None:
    """`backupfs status` said "cancelled: 15" of a backup stopped by kill."""
    src = make_source(tmp_path / "src.img", 4 * MiB, seed=35)
    repo.add_device("h", str(src))

    def hook(n: int, offset: int, length: int) -> None:
        raise stop

    with pytest.raises(KeyboardInterrupt):
        repo.backup("h", "full", source_factory=lambda d: HookedSource(d, hook))
    job = repo.catalog.jobs("h", limit=1)[0]
    assert (job.state, job.error) == ("cancelled", says)
