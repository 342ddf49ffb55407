"""Hostile review of the day's changes (compressed backups, no empty layers,
damage verdicts and the early ENOSPC refusal): each finding as a test."""

from __future__ import annotations

import errno
import os
import subprocess
import struct
from pathlib import Path

import pytest

from engine.errors import BackupfsError
from engine.qcow2.layers import DATA, open_layer
from engine.repo import Repository

KiB = 1024
MiB = 1024 * KiB


def _image(repo: Path, backup_id: str, device: str = "vm1") -> Path:
    return repo / "devices" / device / f"{backup_id}.qcow2"


def _zero_refcount_of_a_data_cluster(image: Path) -> None:
    """Damage the image's structure only: one data cluster's refcount 0
    (what qemu-img check calls 'refcount=0 reference=1'); its data reads as before."""
    with open_layer(str(image), "qcow2") as layer:
        host = next(e.host for e in layer.allocation() if e.kind == DATA)
    with open(image, "r+b") as f:
        head = f.read(104)
        cluster_bits = struct.unpack(">I", head[20:24])[0]
        rt_off = struct.unpack(">Q", head[48:56])[0]
        cs = 1 << cluster_bits
        per_block = cs // 2  # 16-bit refcounts
        index = host // cs
        f.seek(rt_off + 8 * (index // per_block))
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * (index % per_block))
        f.write(b"\0\0")


def test_a_bad_verdict_does_not_outlive_the_image_a_prune_merge_replaced(tmp_path: Path) -> None:
    """A child judged bad for its image's structure alone is rewritten whole,
    from content checked against its checksums, when a prune merges its
    parent into it: the verdict judged a file that is gone, and must not
    refuse every incremental onto the sound new image until someone verifies."""
    src = tmp_path / "vm1.img"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.write(os.urandom(2 * MiB))
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("vm1", str(src))
        full = repo.backup("vm1", "full").record.id
        dev = repo.device("vm1")
        ids = []
        for n in range(2):
            dev.write(MiB + n * 256 * KiB, os.urandom(64 * KiB))
            ids.append(repo.backup("vm1", "incremental").record.id)
    inc1, inc2 = ids
    _zero_refcount_of_a_data_cluster(_image(repo_dir, inc2))
    with Repository.open(str(repo_dir)) as repo:
        report = repo.verify("vm1")
        assert any(p.backup == inc2 and p.what.startswith("image structure") and p.harms_reads
                   for p in report.problems), report.render()
        with pytest.raises(BackupfsError) as info:
            repo.backup("vm1", "incremental", allow_empty=True)
        assert info.value.errno == errno.EINVAL
        repo.prune("vm1", remove=inc1)  # merges inc1 into inc2: a new image under inc2's name
        assert [b.id for b in repo.backups("vm1")] == [full, inc2]
        # No verify since: the old verdict must not refuse an incremental onto the new image.
        res = repo.backup("vm1", "incremental", allow_empty=True)
        assert res.record.parent == inc2
        assert repo.verify("vm1").ok  # and the new image is indeed sound


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 24 MiB tmpfs: a repository disk that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.mount
def test_a_compressed_full_that_fits_is_not_refused_by_the_uncompressed_bound(small_fs: Path,
                                                                               tmp_path: Path) -> None:
    """The early refusal's bound counts every cluster of the source whole: a
    compressed full of 40 MiB that packs into a few MiB was refused on a disk
    with 24 MiB free, every night of a schedule (no backups at all) unless
    forced; and one that really does not fit still fails saying both numbers."""
    repo_dir = small_fs / "repo"
    Repository.init(str(repo_dir))
    src = tmp_path / "src.img"
    line = b"the same text, over and over, packs well under zstd. "
    with open(src, "wb") as f:
        f.write((line * (40 * MiB // len(line) + 1))[: 40 * MiB])
    noise = tmp_path / "noise.img"
    with open(noise, "wb") as f:
        f.write(os.urandom(40 * MiB))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("text", str(src), compress="zstd")
        res = repo.backup("text", "full")
        assert res.record.stored_bytes < 4 * MiB
        assert repo.verify("text").ok
        repo.add_device("noise", str(noise), compress="zstd")
        with pytest.raises(BackupfsError) as info:
            repo.backup("noise", "full")
        assert info.value.errno == errno.ENOSPC
        assert "the backup needed up to" in str(info.value) and "were free" in str(info.value)
        assert [b.id for b in repo.backups("noise")] == []


def test_a_compressed_cluster_split_by_a_child_is_counted_once_in_the_cache(tmp_path: Path) -> None:
    """A parent's compressed cluster that a child with smaller clusters splits
    in two is two extents of one key: asked for twice at once (a read-ahead,
    or the mount's wait for decompression), it was entered twice and counted
    twice, and the count never came back down: the cache believed itself
    full and kept four clusters, and its view looked big enough to be closed."""
    from engine.ccache import CACHE_BYTES
    from engine.chain import ChainView
    from engine.nowait import WouldBlock
    from engine.qcow2.writer import Qcow2Writer

    size, big, small = 4 * MiB, 64 * KiB, 4 * KiB
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    w = Qcow2Writer(str(base), size, big, compress="zstd")
    for c in range(size // big):
        w.write(c * big, (b"cluster %d " % c * big)[:big])
    w.commit()
    w = Qcow2Writer(str(top), size, small, backing_file=base.name, backing_format="qcow2")
    for c in range(size // big):  # one small cluster in the middle of each big one
        w.write(c * big + big // 2, bytes([c % 255 + 1]) * small)
    w.commit()
    view = ChainView.open(str(top), tip_format="qcow2")
    try:
        for off in range(0, size, 128 * KiB):
            try:
                view.read(off, 128 * KiB, nowait=True)
            except WouldBlock:
                for fut in view.pending(off, 128 * KiB) or []:
                    fut.result()
                view.read(off, 128 * KiB)
        cache = view._ccache
        assert cache.memory_bytes() == len(cache) * big
        assert len(cache) == size // big <= CACHE_BYTES // big  # all of them fit, and all are kept
    finally:
        view.close()


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_writes_during_a_scan_that_finds_nothing_are_in_the_next_incremental(tmp_path: Path, compress: str) -> None:
    """A scan that finds the device as its parent left it makes no image and
    trusts the bitmaps again; writes that landed during the scan (behind it
    and ahead of it, the latter copied before they were written) must be
    what the next incremental copies, not lost with the scan's frozen bits."""
    import random
    import threading

    from tests.oracle import qemu_compare
    from tests.test_engine_backup import HookedSource, Snapshots

    size = 16 * MiB
    src = tmp_path / "src.img"
    rng = random.Random(23)
    with open(src, "wb") as f:
        f.write(rng.randbytes(size))
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("vm1", str(src), compress=compress)
        repo.backup("vm1", "full")
        dev = repo.device("vm1")
        snaps = Snapshots(src, tmp_path)
        written: list[int] = []

        def hook(n: int, offset: int, length: int) -> None:
            if n != 3:
                return
            def writer() -> None:
                for off in (0, size - 64 * KiB, offset + length + 3 * MiB):  # behind, far ahead, just ahead
                    dev.write(off, rng.randbytes(8 * KiB))
                    written.append(off)
            t = threading.Thread(target=writer)
            t.start()
            t.join()

        res = repo.backup("vm1", "incremental", scan=True, chunk_bytes=2 * MiB,
                          source_factory=lambda d: HookedSource(d, hook))
        assert res.unchanged and len(written) == 3
        snap = snaps.take()
        inc = repo.backup("vm1", "incremental")
        assert not inc.unchanged
        qemu_compare(repo.image_path(inc.record), snap)


def test_readers_of_a_compressed_chain_while_a_prune_merges_under_it(tmp_path: Path) -> None:
    """Readers of a compressed backup (its decompression running ahead on the
    workers) while a prune merges its parent into it, renaming a new image
    over its name and deleting the parent: the open views read what they
    opened, and a view opened after reads the same bytes from the new image."""
    import random
    import threading

    from tests.test_engine_backup import Snapshots

    size = 16 * MiB
    src = tmp_path / "src.img"
    rng = random.Random(7)
    line = b"compressible text for the chain %d "
    with open(src, "wb") as f:
        f.write(b"".join(line % i for i in range(size // len(line) + 1))[:size])
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir))
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("vm1", str(src), compress="zstd")
        repo.backup("vm1", "full")
        dev = repo.device("vm1")
        ids = []
        for n in range(2):
            for _ in range(20):
                dev.write(rng.randrange(size // 4096) * 4096, (b"write %d " % n) * 512)
            ids.append(repo.backup("vm1", "incremental").record.id)
        expect = Snapshots(src, tmp_path).take().read_bytes()
        x, c = ids
        views = [repo.open_backup(c) for _ in range(3)]
        stop = threading.Event()
        bad: list[str] = []

        def reader(view, seed: int) -> None:
            r = random.Random(seed)
            pos = 0
            while not stop.is_set():
                if r.random() < 0.5:  # sequential: read-ahead on the workers
                    off, pos = pos, (pos + 128 * KiB) % size
                else:
                    off = r.randrange(size)
                n = min(r.choice([4 * KiB, 128 * KiB, 1 * MiB]), size - off)
                if bytes(view.read(off, n)) != expect[off : off + n]:
                    bad.append(f"{off}+{n}")

        threads = [threading.Thread(target=reader, args=(v, i)) for i, v in enumerate(views)]
        for t in threads:
            t.start()
        try:
            repo.prune("vm1", remove=x)
        finally:
            stop.set()
            for t in threads:
                t.join()
            for v in views:
                v.close()
        assert not bad
        with repo.open_backup(c) as after:
            assert bytes(after.read(0, size)) == expect


def test_a_compressed_writer_of_a_big_disk_keeps_no_map_of_all_its_clusters(tmp_path: Path) -> None:
    """The compressed writer told pending clusters by a byte per cluster of
    the whole disk, made at the first write: 512 MiB for a 2 TiB disk with
    4 KiB clusters (1 GiB for 64 TiB at the default 64 KiB), whatever the
    backup stores, where the rest of the writer is bounded (its L2 cache)."""
    import tracemalloc

    from engine.qcow2.writer import Qcow2Writer

    w = Qcow2Writer(str(tmp_path / "big.qcow2"), 2 * 1024**4, 4 * KiB, compress="zstd")
    try:
        tracemalloc.start()
        try:
            for n in range(64):  # out of order, a few pending at a time
                c = (n * 7919) % 4096
                w.write(c * 4 * KiB * 1024, (b"%d " % n * 4 * KiB)[: 4 * KiB])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * MiB, peak
        w.flush()
    finally:
        w.abort()
