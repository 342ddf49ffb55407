"""engine/layout: the names a backup, an import, a prune and recovery agree on."""

from __future__ import annotations

import os
from pathlib import Path

from engine.catalog import BackupRecord, check_backup_row
from engine.layout import BACKUP_ID_RE, BackupFiles, backup_id, merge_names
from engine.repo import Repository


def test_ids_sort_by_time_then_sequence_and_pass_the_catalogs_rule() -> None:
    """`list`, the mount and a prune's order rely on ids sorting as backups were taken."""
    second = 1_765_000_000 * 10**9
    ids = [backup_id(second, 7, "full"), backup_id(second, 8, "incremental"),
           backup_id(second + 10**9, 9, "differential")]
    assert ids[0] == "20251206T054640Z-0007-full"
    assert sorted(ids) == ids
    assert all(BACKUP_ID_RE.fullmatch(i) for i in ids)


def test_a_new_backups_files_are_the_ones_its_row_and_its_intents_name(tmp_path: Path) -> None:
    """The catalog's row check accepts the paths a backup records, and the
    intents cover its temporary image, image and checksums, nothing else."""
    files = BackupFiles(str(tmp_path), "vm1", backup_id(10**18, 1, "full"))
    rec = BackupRecord(id=files.ident, device="vm1", seq=1, kind="full", parent=None, created_ns=10**18,
                       size=1 << 20, cluster_size=65536, granularity=65536, image=files.image_rel,
                       checksums=files.sums_rel, stored_bytes=0)
    assert check_backup_row(str(tmp_path / "catalog.db"), rec) == rec
    assert [os.path.join(str(tmp_path), p) for p in files.intents()] == [files.tmp, files.image, files.sums]
    assert os.path.dirname(files.tmp) == files.dir == str(tmp_path / "devices" / "vm1")
    assert os.path.basename(files.tmp).startswith(".") and not BACKUP_ID_RE.fullmatch(os.path.basename(files.tmp))
    assert all(name.startswith(".tmp-merge-") for name in merge_names(files.ident))


def test_recovery_removes_what_a_backups_intents_name(tmp_path: Path) -> None:
    """A crash between recording the intents and the catalog commit leaves
    files under exactly these names; the next open removes them."""
    Repository.init(str(tmp_path / "repo"))
    src = tmp_path / "src.img"
    src.write_bytes(b"\0" * (1 << 20))
    with Repository.open(str(tmp_path / "repo")) as repo:
        repo.add_device("vm1", str(src))
        files = BackupFiles(repo.path, "vm1", backup_id(10**18, repo.catalog.next_seq(), "full"))
        repo.catalog.record_intents("file", files.intents())
        for made in (files.tmp, files.sums):
            Path(made).write_bytes(b"half")
        user_file = Path(files.dir) / "notes.txt"
        user_file.write_text("mine")
    with Repository.open(str(tmp_path / "repo")):
        pass
    assert not os.path.exists(files.tmp) and not os.path.exists(files.sums)
    assert user_file.read_text() == "mine"
