"""A source changed behind the mount's back: replaced, cut short, or gone.

The bitmap only sees writes that come through the mount. Whatever else
changes the source must not turn into a backup that silently misses it
(SPEC 4 and 7): a replaced source (its path now leads to another file) is
refused until `device add --replace` rebinds it, and the next backup then
scans; a resized or missing one is refused with a clear error, and the rest
keeps working.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import cli, sh
from tests.mounts import Mounted
from tests.oracle import qemu_compare

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB


def _random_file(path: Path, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(SIZE))


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounted]:
    _random_file(tmp_path / "src.raw", 1)
    _random_file(tmp_path / "other.raw", 2)
    cli("init", tmp_path / "repo")
    cli("device", "add", tmp_path / "repo", "vm1", tmp_path / "src.raw")
    cli("device", "add", tmp_path / "repo", "other", tmp_path / "other.raw")
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "repo", tmp_path / "mnt")
    m.start()
    try:
        yield m
    finally:
        m.cleanup()


def _trigger(m: Mounted, line: str, device: str = "vm1") -> tuple[int, str]:
    proc = sh(f"echo {line} > {m.path(device, 'snapshot')}", check=False)
    return proc.returncode, m.path(device, "snapshot").read_text()


def _latest_equals(m: Mounted, path: Path, device: str = "vm1") -> bool:
    return sh(f"cmp {m.path(device, 'backups', 'latest')} {path}", check=False).returncode == 0


def _rebind(m: Mounted, src: Path) -> None:
    """Unmount, `device add --replace` the source, mount again."""
    m.stop()
    out = cli("device", "add", "--replace", m.repo, "vm1", src).stdout.decode()
    assert f"device vm1: source rebound to {src}" in out, out
    m.start()


def test_a_replaced_source_is_refused_until_rebound_then_scanned(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    src = tmp_path / "src.raw"
    assert _trigger(m, "full")[0] == 0
    before = sorted(os.listdir(m.path("vm1", "backups")))
    _random_file(tmp_path / "new.raw", 3)
    os.rename(tmp_path / "new.raw", src)  # mv new.raw src.raw, behind the mount's back

    # Neither a program opening the device nor a backup reads the file the path names now.
    proc = sh(f"cmp {m.path('vm1', 'device')} {src}", check=False)
    assert proc.returncode == 2 and "Input/output error" in proc.stderr, proc.stderr
    rc, status = _trigger(m, "incremental")
    assert rc != 0
    assert (f"device vm1: source {src} now leads to the file with inode {src.stat().st_ino}" in status
            and f"backupfs device add --replace {m.repo} vm1 {src}" in status), status
    assert sorted(os.listdir(m.path("vm1", "backups"))) == before

    # Rebound on purpose: the next backup scans, and holds the new file.
    _rebind(m, src)
    assert "untrusted (its source was rebound" in m.path("vm1", "bitmap").read_text()
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: yes" in status, status
    assert _latest_equals(m, src)
    qemu_compare(m.repo / "devices" / "vm1" / f"{os.readlink(m.path('vm1', 'backups', 'latest'))}.qcow2", src)
    # Writes through the device land in the file at the path.
    sh(f"printf 'hello' | dd of={m.path('vm1', 'device')} bs=1 seek=4096 conv=notrunc status=none")
    assert src.read_bytes()[4096:4101] == b"hello"
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: no" in status and _latest_equals(m, src), status


def test_a_source_written_by_another_program_while_mounted_is_scanned(mounted: Mounted, tmp_path: Path) -> None:
    """A VM started on the image file itself (not on the mount's device)
    writes what the bitmap never sees. The next incremental notices the
    file's modification time moved without a write through backupfs, scans,
    and holds those changes too, not only the ones made through the mount.
    Writes through the mount alone never trigger it."""
    m = mounted
    src = tmp_path / "src.raw"
    dev = m.path("vm1", "device")
    assert _trigger(m, "full")[0] == 0
    sh(f"printf 'through the mount' | dd of={dev} bs=1 seek={MiB} conv=notrunc status=none")
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: no" in status, status  # our own writes: the bitmap is right
    sh(f"printf 'mounted again' | dd of={dev} bs=1 seek={2 * MiB} conv=notrunc status=none")
    sh(f"printf 'behind our back' | dd of={src} bs=1 seek={5 * MiB} conv=notrunc status=none")
    rc, status = _trigger(m, "incremental")
    assert rc == 0, status
    assert "scanned: yes" in status and "written by another program" in status, status
    assert _latest_equals(m, src)
    assert m.path("vm1", "backups", "latest").read_bytes()[5 * MiB : 5 * MiB + 15] == b"behind our back"
    # Re-synchronised: the next one trusts the bitmap again.
    sh(f"printf 'and again' | dd of={dev} bs=1 seek={3 * MiB} conv=notrunc status=none")
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: no" in status, status
    assert _latest_equals(m, src)


def test_another_programs_write_stays_noticed_past_our_writes_and_a_remount(
    mounted: Mounted, tmp_path: Path
) -> None:
    """The other program's write is followed by ours through the mount
    (which moves the file's time again), or by an unmount (which saves the
    time as the one to trust): the next incremental still scans, and holds
    both."""
    m = mounted
    src = tmp_path / "src.raw"
    dev = m.path("vm1", "device")
    assert _trigger(m, "full")[0] == 0
    # The device held open (as a VM holds it) from before the other write
    # to after ours: its open cannot be what notices.
    sh(f"exec 3<>{dev}; printf 'behind our back' | dd of={src} bs=1 seek={5 * MiB} conv=notrunc status=none; "
       "printf 'through the mount' >&3")
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: yes" in status and "written by another program" in status, status
    assert _latest_equals(m, src)
    sh(f"printf 'behind our back again' | dd of={src} bs=1 seek={6 * MiB} conv=notrunc status=none")
    m.stop()
    m.start()
    assert "untrusted" in m.path("vm1", "bitmap").read_text()
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: yes" in status, status
    assert _latest_equals(m, src)


def test_a_source_replaced_then_unmounted_is_refused_after_remount(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    src = tmp_path / "src.raw"
    assert _trigger(m, "full")[0] == 0
    _random_file(tmp_path / "new.raw", 4)
    os.rename(tmp_path / "new.raw", src)
    m.stop()  # nothing opened the device since: the catalog's record tells
    m.start()
    assert "now leads to the file with inode" in m.path("vm1", "bitmap").read_text()
    rc, status = _trigger(m, "incremental")
    assert rc != 0 and "device add --replace" in status, status
    _rebind(m, src)
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: yes" in status, status
    assert _latest_equals(m, src)


def test_a_source_cut_short_is_refused_not_read_short(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    src = tmp_path / "src.raw"
    assert _trigger(m, "full")[0] == 0
    os.truncate(src, SIZE // 2)

    read = sh(f"dd if={m.path('vm1', 'device')} of=/dev/null bs=1M", check=False)
    assert read.returncode != 0 and "Input/output error" in read.stderr
    write = sh(f"printf x | dd of={m.path('vm1', 'device')} bs=1 seek={SIZE - 10} conv=notrunc", check=False)
    assert write.returncode != 0
    assert src.stat().st_size == SIZE // 2  # not grown around a hole
    before = sorted(os.listdir(m.path("vm1", "backups")))
    rc, status = _trigger(m, "incremental")
    assert rc != 0
    assert f"{src} is {SIZE // 2} bytes, registered as {SIZE}" in status, status
    assert sorted(os.listdir(m.path("vm1", "backups"))) == before
    # The other device is untouched by all this.
    assert _trigger(m, "full", "other")[0] == 0 and _latest_equals(m, tmp_path / "other.raw", "other")


def test_a_source_gone_while_mounted_is_an_io_error(mounted: Mounted, tmp_path: Path) -> None:
    """SPEC 5: a source that cannot be read is EIO. ENOENT, "No such file or
    directory", for a snapshot or device file that `ls` shows, sent
    administrators looking for the wrong file."""
    m = mounted
    assert _trigger(m, "full")[0] == 0
    os.rename(tmp_path / "src.raw", tmp_path / "away.raw")
    proc = sh(f"echo incremental > {m.path('vm1', 'snapshot')}", check=False)
    assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
    assert "is gone" in m.path("vm1", "snapshot").read_text()
    proc = sh(f"dd if={m.path('vm1', 'device')} of=/dev/null bs=1M count=1 status=none", check=False)
    assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
    os.rename(tmp_path / "away.raw", tmp_path / "src.raw")
    rc, status = _trigger(m, "incremental")
    assert rc == 0 and "scanned: yes" in status, status


def test_a_missing_source_leaves_the_rest_of_its_tree_visible(mounted: Mounted, tmp_path: Path) -> None:
    m = mounted
    assert _trigger(m, "full")[0] == 0
    m.stop()
    os.unlink(tmp_path / "src.raw")
    m.start()
    names = set(os.listdir(m.path("vm1")))
    assert {"backups", "bitmap", "chain", "snapshot"} <= names
    assert "does not exist" in m.path("vm1", "bitmap").read_text()
    assert len(os.listdir(m.path("vm1", "backups"))) == 2  # the full and `latest`
    out = cli("status", m.repo).stdout.decode()
    assert "other" in out
