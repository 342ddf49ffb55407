"""Imported chains keep their images' times, prune --dry-run says what it would
do and why, and import and prune draw progress on a terminal only.

The chains are QEMU's (qemu-img, qemu-io), dated with `touch -d` as an
administrator's old nightly images would be; `qemu-img compare` is the
oracle for what a prune leaves.
"""

from __future__ import annotations

import os
import pty
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.repo import Repository
from tests.commands import backupfs_cmd, cli, sh
from tests.oracle import qemu_compare, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB


def _chain(d: Path, dates: list[str]) -> list[Path]:
    """A qcow2 chain of len(dates) images, base first, each writing its own
    pattern, each dated (local time) as ``touch -d`` reads ``dates[i]``."""
    images: list[Path] = []
    for i, _ in enumerate(dates):
        image = d / f"night{i}.qcow2"
        backing = ["-b", images[-1].name, "-F", "qcow2"] if images else []
        qemu_img("create", "-f", "qcow2", *backing, str(image), "4M")
        qemu_io(image, f"write -P {0x30 + i} {i * 512}k 192k")
        images.append(image)
    for image, date in zip(images, dates):
        sh(f"touch -d '{date}' {image}")
    return images


def _stamp(ns: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ns / 1e9))


def _rows(repo: Path) -> list[dict]:
    """The catalog's rows as `list --json` gives them (read here: one command fewer)."""
    with Repository.open(str(repo), writable=False) as r:
        return [{"id": b.id, "kind": b.kind, "created_ns": b.created_ns, "stored_bytes": b.stored_bytes,
                 "image": b.image} for b in r.backups("vm")]


def test_import_dates_backups_by_their_images_and_prune_keeps_by_day(tmp_path: Path) -> None:
    images = _chain(tmp_path, ["2026-11-01 08:00", "2026-11-01 20:00", "2026-11-02 12:00", "2026-11-04 12:00"])
    mtimes = [os.stat(i).st_mtime_ns for i in images]
    repo = tmp_path / "repo"
    Repository.init(str(repo))
    imported = cli("import", repo, "vm", images[-1])
    assert imported.stderr == b""  # not a terminal: no progress drawn
    rows = _rows(repo)
    assert [r["created_ns"] for r in rows] == mtimes
    assert [r["id"].split("-")[0] for r in rows] == [_stamp(t) for t in mtimes]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)

    dry = cli("prune", repo, "vm", "--keep-daily", "2", "--dry-run")
    assert dry.stderr == b""
    lines = dry.stdout.decode().splitlines()
    assert lines[:4] == [
        f"would remove: {ids[0]}, merging what it holds into {ids[1]}",
        f"would remove: {ids[1]}, merging what it holds into {ids[2]}",
        f"keep: {ids[2]} (keep-daily 2026-11-02)",
        f"keep: {ids[3]} (newest, keep-daily 2026-11-04)",
    ], lines
    freed = rows[0]["stored_bytes"] + rows[1]["stored_bytes"]
    assert lines[4].startswith(f"would free: at most {freed} bytes"), lines
    assert len(lines) == 5
    assert _rows(repo) == rows  # nothing changed

    pruned = cli("prune", repo, "vm", "--keep-daily", "2")
    assert pruned.stderr == b""
    after = _rows(repo)
    assert [(r["id"], r["kind"]) for r in after] == [(ids[2], "full"), (ids[3], "incremental")]
    assert [r["created_ns"] for r in after] == mtimes[2:]
    for row, original in zip(after, images[2:]):
        qemu_compare(repo / row["image"], original, fmt_b="qcow2")


def test_a_chain_whose_times_go_backwards_keeps_its_order(repo: Repository, tmp_path: Path) -> None:
    """A copied or touched image can be older than its backing file: the
    chain's order wins, the later image dated a nanosecond after its parent."""
    images = _chain(tmp_path, ["2026-11-05 12:00", "2026-11-02 12:00", "2026-11-03 12:00"])
    records = repo.import_chain("vm", str(images[-1]))
    base = os.stat(images[0]).st_mtime_ns
    assert [r.created_ns for r in records] == [base, base + 1, base + 2]
    assert [r.id for r in records] == sorted(r.id for r in records)
    assert [r.kind for r in records] == ["full", "incremental", "incremental"]


def _on_a_terminal(*args: str | os.PathLike[str]) -> tuple[int, bytes, bytes]:
    """Run `backupfs ARGS` with its stderr on a pseudo-terminal (what a user
    sees), stdout a pipe; its exit status, stdout and what the terminal got."""
    master, slave = pty.openpty()
    got = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal's other side is closed
                return
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    try:
        proc = subprocess.Popen(backupfs_cmd() + [str(a) for a in args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        reader.start()
        out, _ = proc.communicate(timeout=120)
        reader.join(timeout=30)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return proc.returncode, out, bytes(got)


def test_import_and_prune_draw_progress_on_a_terminal(tmp_path: Path) -> None:
    images = _chain(tmp_path, ["2026-11-01 12:00", "2026-11-02 12:00", "2026-11-03 12:00"])
    repo = tmp_path / "repo"
    Repository.init(str(repo))
    rc, out, term = _on_a_terminal("import", repo, "vm", images[-1])
    assert rc == 0, term
    assert b"import vm (image 1 of 3)" in term and b"import vm (image 3 of 3)" in term, term
    assert b"Traceback" not in term and out.count(b"\n") == 3  # the records, on stdout as before
    rc, out, term = _on_a_terminal("prune", repo, "vm", "--keep-last", "1")
    assert rc == 0, term
    assert b"prune vm (1 of 2: merging 0001-full into 0002-incremental)" in term, term
    assert b"prune vm (2 of 2: merging 0002-incremental into 0003-incremental)" in term, term
    assert out.decode().count("removed: ") == 2


@pytest.mark.mount
def test_prune_through_the_mount_draws_on_a_terminal_only(tmp_path: Path) -> None:
    from tests.mounts import mounted_device

    with mounted_device(tmp_path, bytes(2 * MiB), name="vm") as m:
        snapshot, device = m.mnt / "vm" / "snapshot", m.mnt / "vm" / "device"
        for i, kind in enumerate(["full", "incremental", "incremental"]):
            with open(device, "r+b") as f:
                f.seek(i * 256 * KiB)
                f.write(bytes([i + 1]) * 200 * KiB)
            sh(f"echo {kind} > {snapshot}")
        dry = cli("prune", m.repo, "vm", "--keep-last", "2", "--dry-run")
        assert dry.stderr == b"" and dry.stdout.decode().count("keep: ") == 2
        rc, out, term = _on_a_terminal("prune", m.repo, "vm", "--keep-last", "1")
        assert rc == 0, term
        assert b"prune vm" in term and b"Traceback" not in term, term
        assert out.decode().count("removed: ") == 2
        m.stop()
