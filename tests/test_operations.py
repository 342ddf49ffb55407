"""verify, restore, prune (with merge), import: engine and command line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import sqlite3
import struct
import time
from pathlib import Path

import pytest

from engine.catalog import BackupRecord, CatalogError
from engine.errors import BackupfsError, UsageError
from engine.fsutil import atomic_write
from engine.integrity import ChecksumMismatch
from engine.prune import RetentionPolicy, select_for_removal
from engine.qcow2.layers import DATA, UNALLOC, open_layer
from engine.repo import Repository
from engine.restore import Target
from engine.units import format_size

from tests.commands import cli, sh
from tests.oracle import qemu_check, qemu_compare, qemu_img, qemu_io, qemu_raw

KiB = 1024
MiB = 1024 * KiB


def _source(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(12):
            f.seek(rng.randrange(0, size - 512 * KiB) // 512 * 512)
            f.write(rng.randbytes(rng.randrange(4 * KiB, 512 * KiB)))
    return path


def _chain(repo: Repository, tmp_path: Path, clusters: list[int], seed: int = 1) -> list[BackupRecord]:
    """A device with a full and len(clusters)-1 incrementals of varied cluster sizes."""
    src = _source(tmp_path / "src.img", 32 * MiB, seed)
    repo.add_device("d", str(src), 64 * KiB)
    dev = repo.device("d")
    rng = random.Random(seed)
    out = [repo.backup("d", "full", cluster_size=clusters[0]).record]
    for cs in clusters[1:]:
        for _ in range(6):
            off = rng.randrange(0, 32 * MiB - 200 * KiB)
            dev.write(off, rng.randbytes(rng.randrange(1, 200 * KiB)) if rng.random() < 0.8 else bytes(100 * KiB))
        out.append(repo.backup("d", "incremental", cluster_size=cs).record)
    return out


def _digests(repo: Repository, device: str = "d") -> dict[str, str]:
    out = {}
    for b in repo.backups(device):
        with repo.open_backup(b.id) as view:
            out[b.id] = hashlib.sha256(view.read(0, view.size)).hexdigest()
    return out


def _all_check(repo: Repository, device: str = "d") -> None:
    for b in repo.backups(device):
        qemu_check(repo.image_path(b))
    assert repo.verify(device).ok


def _first_data_host(image: str) -> tuple[int, int]:
    """(guest offset, host offset) of an image's first data cluster."""
    with open_layer(image, "qcow2") as layer:
        for e in layer.allocation():
            if e.kind == DATA:
                return e.start, e.host
    raise AssertionError("no data cluster")


# -- verify -----------------------------------------------------------------------------


def test_verify_finds_damaged_data_and_reads_refuse_it(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB, 4 * KiB])
    assert repo.verify("d").ok
    victim = backups[1]
    guest, host = _first_data_host(repo.image_path(victim))
    with open(repo.image_path(victim), "r+b") as f:
        f.seek(host + 1000)
        byte = f.read(1)
        f.seek(host + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = repo.verify("d")
    assert not report.ok
    bad = [p for p in report.problems if p.backup == victim.id]
    assert bad and bad[0].offset == guest - guest % (64 * KiB) and "checksum" in bad[0].what
    # Its child's own data is sound, but it reads through the damage.
    assert {(p.backup, p.what) for p in report.problems if p.backup != victim.id} == {
        (backups[2].id, f"reads through damaged backup {victim.id}")}
    # Reading the damaged range fails; the rest reads.
    with repo.open_backup(victim.id) as view:
        with pytest.raises(ChecksumMismatch) as info:
            view.read(guest + 999, 10)
        assert info.value.errno == 5 and victim.id in str(info.value)
        other = (guest + 4 * MiB) % view.size
        assert len(view.read(other, 4096)) == 4096
    # The CLI says which backup and where, and exits 1.
    repo.close()
    proc = cli("verify", tmp_path / "repo", "d", check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 1 and f"BAD {victim.id}: stored data fails its checksum at offset" in out
    ok = cli("verify", tmp_path / "repo", "d", "--backup", backups[0].id)
    assert ok.returncode == 0 and f"ok  {backups[0].id}" in ok.stdout.decode()


def _flip_first_data_byte(image: str) -> int:
    """Damage one byte of an image's first data cluster; returns its guest offset."""
    guest, host = _first_data_host(image)
    with open(image, "r+b") as f:
        f.seek(host + 1000)
        byte = f.read(1)
        f.seek(host + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return guest + 1000


def test_a_prune_does_not_launder_damage(repo: Repository, tmp_path: Path) -> None:
    """The merge read the child without its checksums and gave whatever it
    read fresh ones: a damaged cluster, in the backup removed or in the
    child, was from then on good data to verify, restore and the mount."""
    backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB, 4 * KiB, 64 * KiB])
    before = {b.id: Path(repo.image_path(b)).read_bytes() for b in backups}
    _flip_first_data_byte(repo.image_path(backups[1]))  # the one to remove
    with pytest.raises(BackupfsError, match=rf"backup {backups[2].id}: data at offset .* fails its checksum"):
        repo.prune("d", remove=backups[1].id)
    assert [b.id for b in repo.backups("d")] == [b.id for b in backups]  # nothing removed
    for b in backups[2:]:
        assert Path(repo.image_path(b)).read_bytes() == before[b.id]  # nothing rewritten
    assert not [f for f in os.listdir(Path(repo.path) / "devices" / "d") if f.startswith(".tmp")]
    report = repo.verify("d")
    assert backups[1].id in {p.backup for p in report.problems}


def test_a_missing_checksum_record_leaves_only_its_own_granules_unchecked(repo: Repository, tmp_path: Path) -> None:
    """One backup's .sums lost switched checking off for its whole lineage:
    damage in the full was restored as data, exit 0."""
    backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB, 4 * KiB])
    os.unlink(Path(repo.path) / backups[1].checksums)
    damaged = _flip_first_data_byte(repo.image_path(backups[0]))
    with repo.open_backup(backups[2].id) as view:
        with pytest.raises(ChecksumMismatch, match=backups[2].id):
            view.read(damaged - damaged % (64 * KiB), 64 * KiB)
    with pytest.raises(ChecksumMismatch):
        repo.restore("d", backups[2].id, str(tmp_path / "out.raw"))
    assert not (tmp_path / "out.raw").exists()
    # What the record-less backup holds reads unchecked, and right.
    guest, _ = _first_data_host(repo.image_path(backups[1]))
    with repo.open_backup(backups[1].id) as view:
        expected = qemu_raw(repo.image_path(backups[1]), tmp_path)
        assert view.read(guest, 4096) == expected[guest : guest + 4096]


def test_a_bad_sector_under_an_image_fails_that_backup_not_the_verify(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO reading one image's tables (a bad sector of the repository's disk)
    stopped the whole verify with a bare "Input/output error": no backup
    named, the sound ones unchecked. Now it is that backup's problem, and
    restore names the file."""
    full, inc1, inc2 = _chain(repo, tmp_path, [64 * KiB, 64 * KiB, 64 * KiB])
    bad = os.path.realpath(repo.image_path(inc1))
    real_pread = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        if offset >= 64 * KiB and os.readlink(f"/proc/self/fd/{fd}") == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # all but its header cluster
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    report = repo.verify("d")
    problems = {p.backup: p.what for p in report.problems}
    assert problems[inc1.id].startswith("image unreadable: cannot read"), problems
    assert "Input/output error" in problems[inc1.id]
    assert inc2.id in problems and full.id not in problems, problems
    assert report.checked == [full.id, inc1.id, inc2.id]
    with pytest.raises(BackupfsError, match=f"{os.path.basename(bad)}: cannot read the .* Input/output error"):
        repo.restore("d", inc2.id, str(tmp_path / "out.raw"))
    assert not os.path.exists(tmp_path / "out.raw")


def test_verify_out_of_descriptors_names_no_backup_bad(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its descriptors used up (a low ulimit, many chains open), verify
    called sound backups BAD. Running out says nothing of a backup: the
    verify stops with the error instead."""
    import engine.integrity
    from engine.errors import ImageError

    backups = _chain(repo, tmp_path, [64 * KiB, 64 * KiB])

    def no_fds(path: str, *_args: object) -> None:
        raise ImageError(path, "cannot open: Too many open files", errno.EMFILE)

    monkeypatch.setattr(engine.integrity, "open_layer", no_fds)
    with pytest.raises(ImageError, match="Too many open files") as caught:
        repo.verify("d")
    assert caught.value.errno == errno.EMFILE
    monkeypatch.undo()
    assert repo.verify("d").ok and len(backups) == 2


def test_an_io_error_committing_the_catalog_is_a_clear_error(repo: Repository, tmp_path: Path) -> None:
    """SQLite's EIO flushing its WAL reached the user as "internal error:
    OperationalError: disk I/O error", exit 70. It is a CatalogError now,
    nothing is recorded, and the next try works."""
    real = repo.catalog._conn

    class FailingCommit:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

    src = _source(tmp_path / "src.img", 4 * MiB, 3)
    repo.catalog._conn = FailingCommit()  # type: ignore[assignment]
    try:
        with pytest.raises(CatalogError, match=r"cannot record it in the catalog \(disk I/O error\)"):
            repo.add_device("d", str(src))
    finally:
        repo.catalog._conn = real
    assert repo.catalog.device("d") is None
    repo.add_device("d", str(src))
    assert repo.backup("d", "full").record.kind == "full"


def test_a_failed_fsync_names_its_file(repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync's EIO (device add's directory, an import's .sums file) said
    only "Input/output error": no file named."""
    from engine import durable

    def eio(*_args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    src = _source(tmp_path / "src.img", 4 * MiB, 3)
    monkeypatch.setattr(durable.fs, "fsync_dir", eio)
    with pytest.raises(OSError) as caught:
        repo.add_device("d", str(src))
    assert caught.value.filename == os.path.join(repo.path, "devices") and caught.value.errno == errno.EIO
    monkeypatch.undo()
    monkeypatch.setattr(durable.fs, "fsync", eio)
    with pytest.raises(OSError) as caught:
        atomic_write(str(tmp_path / "x.sums"), b"data")
    assert caught.value.filename == str(tmp_path / "x.sums.tmp")
    assert not (tmp_path / "x.sums.tmp").exists() and not (tmp_path / "x.sums").exists()


def test_a_granule_is_checked_once_per_open_not_per_read(repo: Repository, tmp_path: Path) -> None:
    """At 64 MiB granularity every 4 KiB read of a mounted backup read and
    hashed 64 MiB (100 ms a read). A granule checked once is read as it is
    afterwards; damage is still caught, on every read of it."""
    src = _source(tmp_path / "src.img", 8 * MiB, 4)
    repo.add_device("g", str(src), 4 * MiB)
    full = repo.backup("g", "full").record
    with repo.open_backup(full.id) as view:
        asked: list[int] = []
        plain_read = view.view.read

        def counting(offset: int, length: int, **kw: object) -> object:
            asked.append(length)
            return plain_read(offset, length, **kw)

        view.view.read = counting  # type: ignore[method-assign]
        expected = src.read_bytes()
        assert bytes(view.read(5 * MiB, 4096)) == expected[5 * MiB : 5 * MiB + 4096]
        assert bytes(view.read(6 * MiB, 4096)) == expected[6 * MiB : 6 * MiB + 4096]
        assert bytes(view.read(0, 8 * MiB)) == expected
        assert asked == [4 * MiB, 4096, 8 * MiB]
    # Damage under a granule: its first read in a new open fails, and the next.
    guest, host = _first_data_host(repo.image_path(full))
    with open(repo.image_path(full), "r+b") as f:
        f.seek(host + 100)
        f.write(b"\xff" * 16)
    with repo.open_backup(full.id) as view:
        for _ in range(2):
            with pytest.raises(ChecksumMismatch):
                view.read(guest + 8192, 4096)


def test_verify_reads_only_what_the_chain_holds(repo: Repository, tmp_path: Path) -> None:
    """Verify re-read every recorded granule, zeros too: a full of a thin
    4 TiB disk re-read 4 TiB of holes. Where the chain holds nothing, the
    recorded checksum is compared with the zero checksum instead, so
    recorded data that the image lost (its clusters turned to zeros) is
    still found."""
    size = 64 * MiB + 4 * KiB  # a short last granule too
    src = tmp_path / "thin.img"
    with open(src, "wb") as f:
        f.truncate(size)
        for off in (1 * MiB, 40 * MiB, size - 4 * KiB):
            f.seek(off)
            f.write(random.Random(off).randbytes(4 * KiB))
    repo.add_device("t", str(src))
    full = repo.backup("t", "full").record
    report = repo.verify("t")
    assert report.ok and report.bytes_read <= 3 * 64 * KiB, report.bytes_read
    qemu_io(Path(repo.image_path(full)), "write -z 40M 64k")  # the image loses a cluster it recorded
    report = repo.verify("t")
    assert [(p.what, p.offset) for p in report.problems] == [("stored data fails its checksum", 40 * MiB)]


def test_verify_finds_what_an_image_holds_beyond_its_record(repo: Repository, tmp_path: Path) -> None:
    """Something wrote into a backup image where it held nothing: its reads
    there hide the parent's data, and verify, re-reading only what the
    record names, said ok; restore then refused."""
    backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB, 64 * KiB])
    assert repo.verify("d").ok
    with open_layer(repo.image_path(backups[1]), "qcow2") as layer:
        hole = next(e.start for e in layer.allocation() if e.kind == UNALLOC and e.end - e.start >= 128 * KiB)
    qemu_io(repo.image_path(backups[1]), f"write -P 0x55 {hole} 64k")
    report = repo.verify("d", backup_id=backups[2].id)  # the newest: with what it reads through
    problems = {(p.backup, p.what.split(" (")[0]) for p in report.problems}
    assert (backups[1].id, "the image holds data its checksum record does not cover") in problems
    assert (backups[2].id, f"reads through damaged backup {backups[1].id}") in problems
    assert report.checked == [b.id for b in backups]


def test_verify_finds_broken_links_and_structure(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB, 64 * KiB, 64 * KiB])
    # A child re-pointed to the wrong parent.
    qemu_img("rebase", "-u", "-b", f"{backups[0].id}.qcow2", "-F", "qcow2", repo.image_path(backups[2]))
    # A leaked cluster in another image.
    image = repo.image_path(backups[0])
    raw = bytearray(Path(image).read_bytes())
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, reftable)[0]
    n = len(raw) // 65536
    struct.pack_into(">H", raw, block + 2 * n, 1)
    raw += bytes(65536)
    Path(image).write_bytes(bytes(raw))
    report = repo.verify("d")
    text = report.render()
    assert f"BAD {backups[2].id}: backing file is '{backups[0].id}.qcow2', should be '{backups[1].id}.qcow2'" in text
    assert f"BAD {backups[0].id}: image structure: 1 leaked clusters" in text
    assert f"ok  {backups[1].id}" in text


# -- restore --------------------------------------------------------------------------------


def test_restore_to_a_sparse_file(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB])
    target = tmp_path / "restored.raw"
    result = repo.restore("d", backups[0].id, str(target))
    assert result.kind is Target.FILE and result.backup == backups[0].id and target.stat().st_size == 32 * MiB
    assert target.stat().st_blocks * 512 < 16 * MiB  # the zeros are holes
    qemu_compare(repo.image_path(backups[0]), target)
    with pytest.raises(UsageError, match="exists"):
        repo.restore("d", "latest", str(target))
    repo.restore("d", "latest", str(target), force=True)
    qemu_compare(repo.image_path(backups[1]), target)
    with pytest.raises(UsageError, match="has no backup"):
        repo.restore("d", "nope", str(tmp_path / "x.raw"))


def test_restore_over_the_source_needs_force_and_distrusts_the_bitmap(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB, 64 * KiB])
    src = tmp_path / "src.img"
    with pytest.raises(UsageError, match="source of device d"):
        repo.restore("d", backups[0].id, str(src))
    repo.restore("d", backups[0].id, str(src), force=True)
    qemu_compare(repo.image_path(backups[0]), src)
    assert not repo.device("d").trusted
    # After a remount the reason is still the restore, not "changed behind
    # backupfs's back" (the restored file is a new one, renamed over the old).
    path = repo.path
    repo.close()
    with Repository.open(path) as again:
        assert again.device("d").untrusted_reason == (
            f"its source was overwritten by a restore of backup {backups[0].id}")
        res = again.backup("d", "incremental")
        assert res.scanned and "overwritten by a restore" in (res.scan_reason or "")
        qemu_compare(again.image_path(res.record), src)


@pytest.mark.mount
def test_restore_to_a_block_device_writes_zeros_too(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB])
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xee" * 40 * MiB)  # old data everywhere
    loop = sh(f"losetup -f --show {disk}").stdout.strip()
    try:
        with pytest.raises(UsageError, match="block device"):
            repo.restore("d", backups[0].id, loop)
        held = os.open(loop, os.O_RDONLY | os.O_EXCL)  # as a mounted file system holds it
        try:
            with pytest.raises(UsageError, match="is in use"):
                repo.restore("d", backups[0].id, loop, force=True)
        finally:
            os.close(held)
        result = repo.restore("d", "latest", loop, force=True)
        sh(f"cmp -n {32 * MiB} {loop} {tmp_path / 'src.img'}")
        with open(loop, "rb") as f:
            f.seek(32 * MiB)
            assert f.read() == b"\xee" * 8 * MiB  # the tail beyond the backup: as it was
        assert result.backup == backups[0].id and result.target_size == 40 * MiB
        assert result.summary("d") == (
            f"restored {backups[0].id} of d to {loop} (block device): 32 MiB written of 32 MiB; "
            f"{loop} is 40 MiB: its last 8 MiB were left as they were")
    finally:
        sh(f"losetup -d {loop}")


def test_restore_stops_at_damage_and_leaves_nothing(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB])
    _guest, host = _first_data_host(repo.image_path(backups[0]))
    with open(repo.image_path(backups[0]), "r+b") as f:
        f.seek(host)
        f.write(b"\x00\x01\x02")
    target = tmp_path / "out.raw"
    with pytest.raises(BackupfsError, match="fails its checksum"):
        repo.restore("d", backups[0].id, str(target))
    assert not target.exists()


# -- prune -----------------------------------------------------------------------------------


def test_prune_middle_and_full_keeps_every_other_point_in_time(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [128 * KiB, 4 * KiB, 1 * MiB, 512, 64 * KiB])
    before = _digests(repo)
    ids = [b.id for b in backups]
    repo.prune("d", remove=ids[2])  # 1 MiB clusters merged into 512-byte ones
    repo.prune("d", remove=ids[0])  # the full: its child becomes full
    after = _digests(repo)
    assert set(after) == set(ids) - {ids[0], ids[2]}
    assert all(before[k] == v for k, v in after.items())
    new_full = repo.catalog.backup(ids[1])
    assert new_full is not None and new_full.kind == "full" and new_full.parent is None
    assert repo.catalog.backup(ids[3]).parent == ids[1]  # type: ignore[union-attr]
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", repo.image_path(backups[-1])))
    assert [Path(i["filename"]).name for i in info] == [f"{i}.qcow2" for i in (ids[4], ids[3], ids[1])]
    _all_check(repo)
    files = sorted(os.listdir(Path(repo.path) / "devices" / "d"))
    assert not any(ids[0] in f or ids[2] in f for f in files) and not any(f.startswith(".tmp") for f in files)
    # The chain goes on: the next incremental is still right.
    repo.device("d").write(5 * MiB, b"\x99" * 10)
    rec = repo.backup("d", "incremental").record
    qemu_compare(repo.image_path(rec), tmp_path / "src.img")


def test_prune_a_full_with_a_differential_branch(repo: Repository, tmp_path: Path) -> None:
    src = _source(tmp_path / "src.img", 16 * MiB, 3)
    repo.add_device("d", str(src))
    dev = repo.device("d")
    full = repo.backup("d", "full").record
    dev.write(1 * MiB, b"\x01" * 5000)
    inc = repo.backup("d", "incremental").record
    dev.write(3 * MiB, b"\x02" * 5000)
    diff = repo.backup("d", "differential").record
    dev.write(5 * MiB, b"\x03" * 5000)
    inc2 = repo.backup("d", "incremental").record
    before = _digests(repo)
    plans = repo.prune("d", remove=full.id)
    assert [c.id for c in plans[0].children] == [inc.id, diff.id]
    assert _digests(repo) == {k: v for k, v in before.items() if k != full.id}
    assert repo.catalog.backup(inc.id).kind == "full" and repo.catalog.backup(diff.id).kind == "full"  # type: ignore[union-attr]
    assert repo.catalog.backup(inc2.id).parent == diff.id  # type: ignore[union-attr]
    _all_check(repo)


def test_removing_the_latest_keeps_its_changes_for_the_next_backup(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB, 64 * KiB, 64 * KiB])
    repo.prune("d", remove=backups[-1].id)
    rec = repo.backup("d", "incremental").record
    assert rec.parent == backups[-2].id
    qemu_compare(repo.image_path(rec), tmp_path / "src.img")


def test_keep_last_and_dry_run(repo: Repository, tmp_path: Path) -> None:
    backups = _chain(repo, tmp_path, [64 * KiB] * 6)
    before = _digests(repo)
    plans = repo.prune("d", RetentionPolicy(keep_last=2), dry_run=True)
    assert [p.removed.id for p in plans] == [b.id for b in backups[:4]]
    assert _digests(repo) == before
    repo.prune("d", RetentionPolicy(keep_last=2))
    assert [b.id for b in repo.backups("d")] == [b.id for b in backups[4:]]
    assert _digests(repo) == {k: before[k] for k in (backups[4].id, backups[5].id)}
    _all_check(repo)


def _rec(seq: int, when: str) -> BackupRecord:
    created = int(time.mktime(time.strptime(when, "%Y-%m-%d %H:%M")) * 1e9)
    return BackupRecord(f"b{seq:03d}", "d", seq, "incremental", None, created, 0, 65536, 65536, "", None, 0)


def test_retention_policy_selection() -> None:
    days = [_rec(i, f"2026-11-{d:02d} {h:02d}:00") for i, (d, h) in
            enumerate([(1, 1), (1, 23), (2, 12), (9, 3), (16, 3), (23, 3), (27, 1), (27, 2)], 1)]
    keep = lambda policy: [b.id for b in days if b not in select_for_removal(days, policy)]  # noqa: E731
    assert keep(RetentionPolicy(keep_last=2)) == ["b007", "b008"]
    assert keep(RetentionPolicy(keep_daily=3)) == ["b005", "b006", "b008"]
    # ISO weeks: Nov 23-29 (b006 b007 b008), Nov 16-22 (b005), Nov 9-15 (b004), Oct 26-Nov 1 (b001 b002)
    assert keep(RetentionPolicy(keep_weekly=3)) == ["b004", "b005", "b008"]
    assert keep(RetentionPolicy(keep_monthly=5)) == ["b008"]
    assert keep(RetentionPolicy(keep_last=1, keep_daily=2)) == ["b006", "b008"]
    with pytest.raises(UsageError):
        select_for_removal(days, RetentionPolicy())
    with pytest.raises(UsageError):
        select_for_removal(days, RetentionPolicy(keep_last=0))


@pytest.mark.parametrize("step", ["staged", "pending", "sums-replaced", "image-replaced", "catalog"])
def test_prune_interrupted_at_any_step_leaves_old_or_new(step: str, tmp_path: Path) -> None:
    """Stopped at any step, the next open shows the old chain (before the
    removal was recorded as pending) or the new one (after), never a mix."""
    Repository.init(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo")) as repo:
        backups = _chain(repo, tmp_path, [64 * KiB, 128 * KiB, 4 * KiB, 64 * KiB])
        before = _digests(repo)

        def crash(name: str) -> None:
            if name == step:
                raise KeyboardInterrupt(f"crash at {name}")

        with pytest.raises(KeyboardInterrupt):
            repo.prune("d", remove=backups[1].id, hook=crash)
    old = [b.id for b in backups]
    new = [b.id for i, b in enumerate(backups) if i != 1]
    with Repository.open(str(tmp_path / "repo")) as repo:
        ids = [b.id for b in repo.backups("d")]
        assert ids == (old if step == "staged" else new)
        assert all(before[k] == v for k, v in _digests(repo).items())
        _all_check(repo)
        files = os.listdir(Path(repo.path) / "devices" / "d")
        assert not any(f.startswith(".tmp") for f in files)
        assert any(backups[1].id in f for f in files) == (step == "staged")


def test_prune_cli(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path))
    with Repository.open(str(repo_path)) as repo:
        backups = _chain(repo, tmp_path, [64 * KiB] * 4)
    out = cli("prune", repo_path, "d", "--keep-last", "3", "--dry-run").stdout.decode()
    assert out.splitlines() == [
        f"would remove: {backups[0].id}, merging what it holds into {backups[1].id}",
        f"keep: {backups[1].id} (keep-last 3)",
        f"keep: {backups[2].id} (keep-last 3)",
        f"keep: {backups[3].id} (newest, keep-last 3)",
        f"would free: at most {backups[0].stored_bytes} bytes ({format_size(backups[0].stored_bytes)}): the stored "
        "bytes of the 1 backup removed; "
        "less what merging 1 of them into their children adds back",
    ]
    out = cli("prune", repo_path, "d", "--remove", backups[2].id).stdout.decode()
    assert out.startswith(f"removed: {backups[2].id}")
    proc = cli("prune", repo_path, "d", check=False)
    assert proc.returncode == 1 and b"give either a retention rule or --remove" in proc.stderr
    proc = cli("prune", repo_path, "d", "--remove", "nope", check=False)
    assert proc.returncode == 1 and b"has no backup 'nope'" in proc.stderr


# -- import ------------------------------------------------------------------------------------


def _qemu_chain(d: Path) -> list[Path]:
    raw = d / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(640 * KiB)
        f.write(os.urandom(1 * MiB))
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", str(d / "l1.qcow2"), "8M")
    qemu_io(d / "l1.qcow2", "write -P 0x11 100k 7k", "write -z 1M 64k")
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k,compression_type=zstd",
             "-b", "l1.qcow2", "-F", "qcow2", str(d / "l2.qcow2"), "10M")
    qemu_io(d / "l2.qcow2", "write -P 0x22 2k 2k", "write -c -P 0x33 4M 128k", "write -P 0x44 9M 4k")
    return [raw, d / "l1.qcow2", d / "l2.qcow2"]


def test_import_a_qemu_chain(repo: Repository, tmp_path: Path) -> None:
    chain = _qemu_chain(tmp_path)
    records = repo.import_chain("vm", str(chain[-1]))
    assert [r.kind for r in records] == ["full", "incremental", "incremental"]
    assert [r.id for r in records] == sorted(r.id for r in records)
    for rec, original in zip(records, chain):
        expected = qemu_raw(original, tmp_path)
        expected += bytes(rec.size - len(expected))  # older images may be smaller
        with repo.open_backup(rec.id) as view:
            assert view.read(0, view.size) == expected, original
        qemu_check(repo.image_path(rec))
    assert repo.verify("vm").ok
    with pytest.raises(BackupfsError, match="no live source"):
        repo.backup("vm", "incremental")
    # The originals were only read.
    assert qemu_img("check", str(chain[-1]))


def test_import_of_a_chain_with_a_shorter_image_in_the_middle(repo: Repository, tmp_path: Path) -> None:
    """base (8M) <- mid (2M) <- tip (6M): past 2M the tip reads zeros
    where it holds nothing, not the base's bytes, because QEMU never reads
    a backing file past the end of the image above it."""
    base, mid, tip = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "tip"))
    qemu_img("create", "-f", "qcow2", str(base), "8M")
    qemu_io(base, "write -P 0x11 0 8M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=128k", "-b", base.name, "-F", "qcow2", str(mid),
             str(2 * MiB - 3 * 512))  # its end inside a cluster, ours and its own
    qemu_io(mid, "write -P 0x22 0 64k")
    qemu_img("create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(tip), "6M")
    qemu_io(tip, "write -P 0x33 5M 64k")
    records = repo.import_chain("vm", str(tip))
    for rec, original in zip(records, (base, mid, tip)):
        expected = qemu_raw(original, tmp_path)[: rec.size]
        expected += bytes(rec.size - len(expected))
        with repo.open_backup(rec.id) as view:
            assert view.read(0, view.size) == expected, original
        qemu_check(repo.image_path(rec))
    qemu_compare(repo.image_path(records[-1]), tip, fmt_b="qcow2")
    assert repo.verify("vm").ok


def test_import_of_files_dated_in_the_future_keeps_ids_in_time_order(repo: Repository, tmp_path: Path) -> None:
    """An image's time becomes its backup's: one dated 2030 (a skewed
    clock) gave an id that `ls` sorted after every later backup, so
    `ls backups | tail -1` named it instead of the newest."""
    chain = _qemu_chain(tmp_path)
    future = 1_893_456_000 * 10**9  # 2030-01-01
    for image in chain:
        os.utime(image, ns=(future, future))
    live = tmp_path / "live.raw"
    live.write_bytes(qemu_raw(chain[-1], tmp_path))
    records = repo.import_chain("vm", str(chain[-1]), source=str(live))
    now = time.time_ns()
    assert all(r.created_ns <= now for r in records)
    later = repo.backup("vm", "incremental", allow_empty=True).record
    ids = [r.id for r in records] + [later.id]
    assert ids == sorted(ids)


def test_import_with_source_continues_with_scans(repo: Repository, tmp_path: Path) -> None:
    chain = _qemu_chain(tmp_path)
    live = tmp_path / "live.raw"
    live.write_bytes(qemu_raw(chain[-1], tmp_path))
    repo.import_chain("vm", str(chain[-1]), source=str(live))
    with open(live, "r+b") as f:
        f.seek(7 * MiB)
        f.write(b"\x55" * 3000)
    res = repo.backup("vm", "incremental")
    assert res.scanned and res.record.stored_bytes == 64 * KiB
    qemu_compare(repo.image_path(res.record), live)


def test_import_refuses_bad_input(repo: Repository, tmp_path: Path) -> None:
    chain = _qemu_chain(tmp_path)
    with pytest.raises(UsageError, match="invalid device name"):
        repo.import_chain("../x", str(chain[-1]))
    sh(f"qemu-img create -q -f qcow2 -u -b missing.qcow2 -F qcow2 {tmp_path / 'o.qcow2'} 1M")
    with pytest.raises(BackupfsError, match="not found"):
        repo.import_chain("o", str(tmp_path / "o.qcow2"))
    assert repo.catalog.device("o") is None
    (tmp_path / "small.raw").write_bytes(b"x" * 100)
    with pytest.raises(UsageError, match="is 100 bytes"):
        repo.import_chain("s", str(chain[-1]), source=str(tmp_path / "small.raw"))
    assert repo.catalog.device("s") is None


def test_an_import_killed_between_layers_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL after two of three layers were written: the repository opens
    with no trace of the device (not two thirds of its history), and the
    same import then runs whole."""
    import signal
    import subprocess
    import sys

    chain = _qemu_chain(tmp_path)
    cli("init", tmp_path / "repo")
    script = (
        "import os, signal, sys\n"
        "from engine.repo import Repository\n"
        "repo = Repository.open(sys.argv[1])\n"
        "def on_layer(n, total, path):\n"
        "    if n == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "repo.import_chain('vm', sys.argv[2], on_layer=on_layer)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "repo"), str(chain[-1])],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    written = sorted(p.name for p in (tmp_path / "repo" / "devices" / "vm").iterdir())
    assert len([n for n in written if n.endswith(".qcow2")]) == 2, written  # the kill came between layers
    repo = Repository.open(str(tmp_path / "repo"))
    try:
        assert repo.catalog.device("vm") is None and repo.catalog.backups() == []
        assert not (tmp_path / "repo" / "devices" / "vm").exists()
        records = repo.import_chain("vm", str(chain[-1]))
        assert [r.kind for r in records] == ["full", "incremental", "incremental"]
        assert repo.verify("vm").ok
    finally:
        repo.close()


def test_import_cli(tmp_path: Path) -> None:
    chain = _qemu_chain(tmp_path)
    cli("init", tmp_path / "repo")
    out = cli("import", tmp_path / "repo", "vm", chain[-1]).stdout.decode().splitlines()
    assert [line.split("\t")[1] for line in out] == ["full", "incremental", "incremental"]
    listed = cli("list", tmp_path / "repo", "vm").stdout.decode().splitlines()[1:]
    assert [line.split("\t")[0] for line in listed] == [line.split("\t")[0] for line in out]

