"""Damage that guides: verify's verdicts kept in the catalog, an incremental
onto a damaged backup refused (or a full taken instead), and what verify
says to do. Real images damaged on disk: one stored cluster's bytes flipped,
so that its checksum fails."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from engine.errors import BackupfsError
from engine.qcow2.layers import DATA, open_layer
from engine.repo import Repository
from tests.commands import cli, sh
from tests.mounts import Mounted

KiB = 1024
MiB = 1024 * KiB


def flip_stored_cluster(image: Path, guest: int | None = None) -> tuple[int, bytes]:
    """Flip 16 bytes of the data cluster the image stores for disk offset
    ``guest`` (None: its first); returns (file offset, the bytes that were
    there) to put them back."""
    with open_layer(str(image), "qcow2") as layer:
        host = next(e.host + (0 if guest is None else guest - e.start) for e in layer.allocation()
                    if e.kind == DATA and (guest is None or e.start <= guest < e.end))
    with open(image, "r+b") as f:
        f.seek(host + 100)
        old = f.read(16)
        f.seek(host + 100)
        f.write(bytes(b ^ 0xFF for b in old))
    return host + 100, old


def put_back(image: Path, at: tuple[int, bytes]) -> None:
    with open(image, "r+b") as f:
        f.seek(at[0])
        f.write(at[1])


def image_of(repo: Path, backup_id: str, device: str = "vm1") -> Path:
    return repo / "devices" / device / f"{backup_id}.qcow2"


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, list[str]]:
    """A repository with vm1: full, incremental, incremental (2 MiB of data in 4 MiB)."""
    src = tmp_path / "vm1.img"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.write(os.urandom(2 * MiB))
    repo_dir = tmp_path / "repo"
    Repository.init(str(repo_dir))
    ids = []
    with Repository.open(str(repo_dir)) as repo:
        repo.add_device("vm1", str(src))
        ids.append(repo.backup("vm1", "full").record.id)
        dev = repo.device("vm1")
        for n in range(2):
            dev.write(MiB + n * 256 * KiB, os.urandom(64 * KiB))
            ids.append(repo.backup("vm1", "incremental").record.id)
    return repo_dir, ids


def test_an_incremental_onto_a_damaged_backup_is_refused_until_a_good_verify(chain: tuple[Path, list[str]]) -> None:
    repo_dir, (full, inc1, inc2) = chain
    flipped = flip_stored_cluster(image_of(repo_dir, inc1))
    with Repository.open(str(repo_dir)) as repo:
        # Before a verify nothing is known: the backup is taken (and would read the damage).
        report = repo.verify("vm1")
        assert not report.ok
        text = report.render()
        assert f"BAD {inc1}: stored data fails its checksum" in text
        assert f"BAD {inc2}: reads through damaged backup {inc1}" in text
        assert f"ok  {full}" in text
        # What to do: restore from the good one, take a full, remove the damaged ones newest first.
        assert f"what to do: restore from a backup that verifies, e.g. the newest: backupfs restore {repo_dir} " \
               f"vm1 {full} TARGET" in text
        assert f"what to do: take a full backup now to start a new chain: backupfs backup {repo_dir} vm1 full" in text
        assert f"newest first ({inc2}, {inc1}): backupfs prune {repo_dir} vm1 --remove ID" in text

        with pytest.raises(BackupfsError) as info:
            repo.backup("vm1", "incremental")
        assert info.value.errno == errno.EINVAL
        message = str(info.value)
        assert f"would read through backup {inc1}, which verify found damaged" in message
        assert "stored data fails its checksum" in message and "take a full backup" in message
        assert "\n" not in message
        assert [b.id for b in repo.backups("vm1")] == [full, inc1, inc2]  # nothing made
        # auto_full: a new chain instead of a refusal.
        res = repo.backup("vm1", "incremental", auto_full=True)
        assert res.record.kind == "full" and res.record.parent is None
        # The next incremental builds on that full: taken.
        assert repo.backup("vm1", "incremental", allow_empty=True).record.parent == res.record.id
        # Repaired (the bytes put back) and verified good: refusals end.
    put_back(image_of(repo_dir, inc1), flipped)
    with Repository.open(str(repo_dir)) as repo:
        assert repo.verify("vm1", inc2).ok
        assert repo.catalog.bad_verdicts([inc1, inc2]) == {}


def test_the_cli_refuses_and_verify_says_what_to_do(chain: tuple[Path, list[str]]) -> None:
    repo_dir, (full, inc1, inc2) = chain
    flip_stored_cluster(image_of(repo_dir, full))
    proc = cli("verify", repo_dir, "vm1", check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 1
    assert f"BAD {full}: stored data fails its checksum" in out and "3 backups checked, 3 bad" in out
    # Nothing verifies: no restore to advise, the readable files to copy out instead.
    assert "no verified backup of vm1 is left to restore from" in out
    assert f"newest first ({inc2}, {inc1}, {full})" in out
    proc = cli("backup", repo_dir, "vm1", "incremental", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and f"would read through backup {full}" in err and "--auto-full" in err
    assert len(err.strip().splitlines()) == 1
    proc = cli("backup", repo_dir, "vm1", "differential", check=False)  # its parent, the full, is damaged
    assert proc.returncode == 1 and f"would read through backup {full}" in proc.stderr.decode()


RESTORE_FILE = Path(__file__).resolve().parent.parent / "mount-scripts" / "backupfs-restore-file"


@pytest.mark.mount
def test_a_damaged_backup_through_the_mount(tmp_path: Path) -> None:
    """The trigger refuses an incremental onto it (EINVAL) or takes a full
    (auto_full=1); a restore says why it failed; the file-restore helper
    says it is an I/O error, not a disk without a filesystem."""
    disk = tmp_path / "vm1.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    sh(f"echo 'start=2048, type=83' | sfdisk -q {disk}")  # p1 from 1 MiB: ext4
    sh(f"mkfs.ext4 -q -F -E offset={MiB} {disk} 15M")
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", disk)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    try:
        m.start()
        snapshot = m.path("vm1", "snapshot")
        sh(f"echo full > {snapshot}")
        full = os.readlink(m.path("vm1", "backups", "latest"))
        flip_stored_cluster(image_of(repo, full), guest=MiB)  # where p1's superblock is
        backup = m.path("vm1", "backups", full)

        proc = cli("restore", repo, "vm1", "latest", tmp_path / "out.img", check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and f"reading backup {full} through the mount at offset" in err
        assert f"backup {full}: data at offset {MiB} (+65536 bytes) fails its checksum" in err, err
        assert len(err.strip().splitlines()) == 1

        proc = subprocess.run([str(RESTORE_FILE), str(backup), str(tmp_path / "look"), "--", "true"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert f"I/O error reading partition 1 of backup {backup} at byte {MiB}: Input/output error" in proc.stderr
        assert "fails its checksum" in proc.stderr and "no filesystem" not in proc.stderr, proc.stderr
        assert not (tmp_path / "look").exists() and str(backup) not in sh("losetup -a").stdout

        proc = cli("verify", repo, "vm1", check=False)
        out = proc.stdout.decode()
        assert proc.returncode == 1 and f"BAD {full}: stored data fails its checksum at offset {MiB}" in out
        assert "what to do: take a full backup now" in out

        proc = sh(f"echo incremental > {snapshot}", check=False)
        assert proc.returncode != 0 and "Invalid argument" in proc.stderr
        status = snapshot.read_text()
        assert f"error: EINVAL: device vm1: a new incremental would read through backup {full}, which verify " \
               "found damaged" in status, status
        sh(f"echo 'incremental auto_full=1' > {snapshot}")
        status = snapshot.read_text()
        assert "kind: full" in status and "parent: -" in status
        m.stop()
    finally:
        m.cleanup()


def test_a_catalog_from_before_verdicts_gets_the_table(chain: tuple[Path, list[str]]) -> None:
    """The upgrade is idempotent and within the schema version; a catalog
    read beside its owner before it has the table has no verdicts."""
    import sqlite3

    from engine.catalog import Catalog

    repo_dir, (full, inc1, _inc2) = chain
    conn = sqlite3.connect(repo_dir / "catalog.db")
    conn.execute("DROP TABLE verdicts")
    conn.commit()
    conn.close()
    reader = Catalog.open(str(repo_dir / "catalog.db"), readonly=True)
    try:
        assert reader.bad_verdicts([full, inc1]) == {}
    finally:
        reader.close()
    flip_stored_cluster(image_of(repo_dir, inc1))
    for _ in range(2):
        with Repository.open(str(repo_dir)) as repo:
            assert not repo.verify("vm1", inc1).ok
            assert list(repo.catalog.bad_verdicts([full, inc1])) == [inc1]


def test_a_backup_whose_header_magic_is_damaged_is_refused_not_read_as_raw(chain: tuple[Path, list[str]]) -> None:
    """A repository's images are qcow2 by construction: one whose magic is
    damaged was opened as a raw disk (its format probed), so reads failed
    on checksums far from the cause. It is refused, naming the header."""
    repo_dir, (full, inc1, _inc2) = chain
    for damaged in (inc1, full):  # the tip itself, and a backing file below a sound tip
        image = image_of(repo_dir, damaged)
        with open(image, "r+b") as f:
            magic = f.read(4)
            f.seek(0)
            f.write(b"XXXX")
        try:
            with Repository.open(str(repo_dir)) as repo:
                with pytest.raises(BackupfsError) as info:
                    repo.open_backup(inc1).close()
                assert "not a qcow2 image (bad magic)" in str(info.value)
                assert str(image) in str(info.value) or damaged in str(info.value)
                report = repo.verify("vm1", inc1)
                assert any(p.backup == damaged and "bad magic" in p.what for p in report.problems)
        finally:
            with open(image, "r+b") as f:
                f.write(magic)
