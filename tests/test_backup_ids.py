"""Backup ids as people type them (SPEC §12): the whole id, `latest`, or a unique suffix
after the timestamp; an ambiguous suffix is an error naming the candidates."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.layout import matching_ids
from engine.repo import Repository
from tests.commands import cli

IDS = ["20261127T090000Z-0001-full", "20261127T090000Z-0002-incremental", "20261128T090000Z-0012-incremental"]


def test_suffixes_after_the_timestamp() -> None:
    assert matching_ids("0002", IDS) == [IDS[1]]
    assert matching_ids("0002-incremental", IDS) == [IDS[1]]
    assert matching_ids(IDS[2], IDS) == [IDS[2]]
    assert matching_ids("incremental", IDS) == []  # a kind alone names no one backup
    assert matching_ids("000", IDS) == []  # a suffix is whole parts, not a prefix of digits
    assert matching_ids("20261127T090000Z", IDS) == []


def test_commands_take_latest_and_suffixes(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "vm.img"
    src.write_bytes(random.Random(3).randbytes(1 << 20))
    repo.add_device("vm", str(src))
    full = repo.backup("vm", "full").record
    inc = repo.backup("vm", "incremental", allow_empty=True).record
    seq = inc.id.split("-")[1]
    assert repo.resolve_backup("vm", seq).id == inc.id
    assert repo.resolve_backup("vm", f"{seq}-incremental").id == inc.id
    assert repo.resolve_backup("vm", "latest").id == inc.id
    with pytest.raises(UsageError, match="has no backup"):
        repo.resolve_backup("vm", "9999")
    report = repo.verify("vm", seq)
    assert report.ok and inc.id in report.checked
    repo.close()
    out = tmp_path / "restored.img"
    cli("restore", repo.path, "vm", full.id.split("-")[1], out)
    assert out.read_bytes() == src.read_bytes()


def test_a_suffix_two_ids_end_with_names_both() -> None:
    """Imported ids need not follow our format: two can end alike, and both are candidates
    (resolve_backup then refuses, naming them)."""
    assert matching_ids("x-1", ["a-x-1", "b-x-1", "c-x-2"]) == ["a-x-1", "b-x-1"]


def test_version() -> None:
    out = cli("--version").stdout.decode()
    assert re.fullmatch(r"backupfs \d+\.\d+\.\d+\n", out), out


@pytest.mark.mount
def test_a_mounted_repository_restores_by_suffix(tmp_path: Path) -> None:
    from tests.mounts import mounted_device

    data = random.Random(4).randbytes(1 << 20)
    with mounted_device(tmp_path, data, name="vm") as m:
        (m.mnt / "vm" / "snapshot").write_text("full\n")
        ident = next(n for n in (m.mnt / "vm" / "backups").iterdir() if n.name != "latest").name
        out = tmp_path / "restored.img"
        cli("restore", m.repo, "vm", ident.split("-")[1], out)
        assert out.read_bytes() == data
        m.stop()


def test_list_and_device_list_as_json(repo: Repository, tmp_path: Path) -> None:
    """For scripts: what `list` and `device list` show, as data (SPEC §12)."""
    import json

    src = tmp_path / "vm.img"
    src.write_bytes(random.Random(5).randbytes(1 << 20))
    repo.add_device("vm", str(src), 64 * 1024)
    full = repo.backup("vm", "full", label="first ünïcode").record
    inc = repo.backup("vm", "incremental", allow_empty=True).record
    repo.close()
    rows = json.loads(cli("list", repo.path, "--json").stdout)
    assert [(r["id"], r["kind"], r["parent"]) for r in rows] == [(full.id, "full", None),
                                                                   (inc.id, "incremental", full.id)]
    assert rows[0]["label"] == "first ünïcode" and rows[0]["size"] == 1 << 20
    assert rows[0]["stored_bytes"] == full.stored_bytes and rows[1]["created_ns"] == inc.created_ns
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[0]["created"])
    assert json.loads(cli("list", repo.path, "vm", "--json").stdout) == rows
    assert json.loads(cli("device", "list", repo.path, "--json").stdout) == [
        {"name": "vm", "source": str(src), "size": 1 << 20, "granularity": 64 * 1024, "compress": "none"}]
