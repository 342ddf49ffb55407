"""`import` reads backing files only where it should, and never guesses a format.

A backing name is text from whoever wrote the image, and `import` runs as
root into the repository: a chain whose backing name is absolute, climbs
out with ../, goes through a symlink or names a device or a FIFO must be
refused with one line naming the backing name and the image, leaving no
device; --allow-outside DIR lets the user name another directory. A raw
base is read as raw even when its bytes start with a qcow2 header.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from engine.repo import Repository
from tests.commands import cli
from tests.oracle import qemu_img, qemu_io, qemu_raw
from tests.users import OtherUser

MiB = 1024 * 1024


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """An empty repository, as `backupfs init` makes it (made in this process)."""
    path = tmp_path / "repo"
    Repository.init(str(path))
    return path


def _overlay(tip: Path, backing: str, fmt: str | None = "qcow2", write: bool = True) -> None:
    """A qcow2 image over ``backing``, the name written as given (-u: not
    opened); ``write``: some data of its own (QEMU then opens the backing file)."""
    args = ["create", "-q", "-f", "qcow2", "-u", "-b", backing] + (["-F", fmt] if fmt else []) + [str(tip), "4M"]
    qemu_img(*args)
    if write:
        qemu_io(tip, "write -P 0x77 1M 64k")


def _forget_backing_format(image: Path) -> None:
    """Make the backing format extension the end of the header extensions,
    as an image written by an old QEMU (no -F) has none."""
    with open(image, "r+b") as f:
        header = f.read(4096)
        at = header.index(struct.pack(">I", 0xE2792ACA), 72)
        f.seek(at)
        f.write(bytes(8))


def _base(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu_io(path, "write -P 0x55 0 2M")


def _refused(repo_dir: Path, tip: Path, *why: str, extra: tuple[str, ...] = ()) -> str:
    """Import must fail with one line saying ``why``, leaving no device."""
    proc = cli("import", repo_dir, "vm", tip, *extra, check=False, timeout=20)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    for words in why:
        assert words in err, err
    assert "vm" not in cli("device", "list", repo_dir).stdout.decode()
    assert not (repo_dir / "devices" / "vm").exists()
    return err


def _imported_equals(repo_dir: Path, tip: Path, scratch: Path, *extra: str) -> None:
    """Import works and the newest backup reads as QEMU reads the tip."""
    out = cli("import", repo_dir, "vm", tip, *extra).stdout.decode().splitlines()
    newest = out[-1].split("\t")[0]
    image = repo_dir / "devices" / "vm" / f"{newest}.qcow2"
    assert qemu_raw(image, scratch) == qemu_raw(tip, scratch)


def test_an_absolute_backing_outside_the_tip_dir(repo_dir: Path, tmp_path: Path) -> None:
    outside, vms = tmp_path / "outside", tmp_path / "vms"
    outside.mkdir()
    vms.mkdir()
    _base(outside / "base.qcow2")
    _overlay(vms / "tip.qcow2", str(outside / "base.qcow2"))
    err = _refused(repo_dir, vms / "tip.qcow2", str(vms / "tip.qcow2"), repr(str(outside / "base.qcow2")),
                   "--allow-outside")
    assert err.startswith("backupfs: "), err
    _imported_equals(repo_dir, vms / "tip.qcow2", tmp_path, "--allow-outside", str(outside))


def test_a_backing_name_that_climbs_out(repo_dir: Path, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    vms.mkdir()
    _base(tmp_path / "base.qcow2")
    _overlay(vms / "tip.qcow2", "../base.qcow2")
    _refused(repo_dir, vms / "tip.qcow2", "'../base.qcow2'", "--allow-outside")
    _imported_equals(repo_dir, vms / "tip.qcow2", tmp_path, "--allow-outside", str(tmp_path))


def test_a_backing_file_that_is_a_symlink_out(repo_dir: Path, tmp_path: Path) -> None:
    """A link inside the tip's directory that leads out is refused; one
    that stays inside (a subdirectory) is followed."""
    secret, vms = tmp_path / "secret", tmp_path / "vms"
    secret.mkdir()
    (vms / "sub").mkdir(parents=True)
    _base(secret / "disk.qcow2")
    os.symlink(secret / "disk.qcow2", vms / "base.qcow2")
    _overlay(vms / "tip.qcow2", "base.qcow2")
    _refused(repo_dir, vms / "tip.qcow2", "'base.qcow2'", f"leads to {secret / 'disk.qcow2'}")
    # A symlinked directory on the way is no different.
    os.symlink(secret, vms / "sub" / "d")
    _overlay(vms / "tip2.qcow2", "sub/d/disk.qcow2")
    _refused(repo_dir, vms / "tip2.qcow2", "'sub/d/disk.qcow2'", "--allow-outside")
    # Inside the tree, a link is fine.
    os.unlink(vms / "base.qcow2")
    _base(vms / "sub" / "real.qcow2")
    os.symlink("sub/real.qcow2", vms / "base.qcow2")
    _imported_equals(repo_dir, vms / "tip.qcow2", tmp_path)


def test_a_tip_that_is_a_symlink(repo_dir: Path, tmp_path: Path) -> None:
    _base(tmp_path / "base.qcow2")
    os.symlink(tmp_path / "base.qcow2", tmp_path / "tip.qcow2")
    _refused(repo_dir, tmp_path / "tip.qcow2", "tip.qcow2: is a symlink")


@pytest.mark.mount
def test_a_block_device_as_backing(repo_dir: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4 * MiB))
    loop = subprocess.run(["losetup", "-f", "--show", str(disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        _overlay(tmp_path / "tip.qcow2", loop, "raw")
        _refused(repo_dir, tmp_path / "tip.qcow2", repr(loop), "--allow-outside")
        # Allowed where it lives, it is still no regular file.
        _refused(repo_dir, tmp_path / "tip.qcow2", repr(loop), "is a block device, not a regular file",
                 extra=("--allow-outside", "/dev"))
        # A device node inside the tip's directory itself, the same.
        os.mknod(tmp_path / "node.raw", 0o600 | 0o060000, os.stat(loop).st_rdev)
        _overlay(tmp_path / "tip2.qcow2", "node.raw", "raw")
        _refused(repo_dir, tmp_path / "tip2.qcow2", "'node.raw'", "is a block device")
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_a_fifo_as_backing_fails_fast(repo_dir: Path, tmp_path: Path) -> None:
    """It hung the import (holding the repository's lock) until someone wrote to it."""
    os.mkfifo(tmp_path / "base.raw")
    _overlay(tmp_path / "tip.qcow2", "base.raw", "raw", write=False)  # QEMU itself would hang on it
    _refused(repo_dir, tmp_path / "tip.qcow2", "'base.raw'", "is a FIFO, not a regular file")


def test_a_raw_base_with_a_qcow2_header_stays_raw(repo_dir: Path, tmp_path: Path) -> None:
    """Probing the base read it as the qcow2 image its bytes pretend to be
    (and followed that image's own backing name)."""
    inner = tmp_path / "inner.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", str(inner), "4M")
    base = tmp_path / "base.raw"
    data = bytearray(inner.read_bytes())
    data += b"\x5a" * (4 * MiB - len(data))
    base.write_bytes(bytes(data))
    tip = tmp_path / "tip.qcow2"
    _overlay(tip, "base.raw", "raw")
    expected = qemu_raw(tip, tmp_path)  # QEMU, told the format
    _forget_backing_format(tip)
    _refused(repo_dir, tip, "'base.raw'", "no format recorded", "--backing-format")
    out = cli("import", repo_dir, "vm", tip, "--backing-format", "raw").stdout.decode().splitlines()
    newest = out[-1].split("\t")[0]
    assert qemu_raw(repo_dir / "devices" / "vm" / f"{newest}.qcow2", tmp_path) == expected
    assert out[0].endswith("(raw)"), out


def test_a_users_chain_cannot_make_root_read_a_secret(repo_dir: Path, other_user: OtherUser, open_tmp: Path) -> None:
    """The scenario itself: a user leaves an image in their directory whose
    backing names a file only root can read (or a symlink to it), and asks
    root to import it; the secret must not end up in a backup."""
    mine = open_tmp / "u"
    mine.mkdir()
    os.chown(mine, other_user.uid, other_user.gid)
    secret = open_tmp / "secret.raw"
    secret.write_bytes(b"root only\n" * 1000 + bytes(4 * MiB - 10000))
    secret.chmod(0o600)
    made = other_user.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw",
                          str(mine / "tip.qcow2"), "4M")
    assert made.returncode == 0, made.stderr
    other_user.run("ln", "-s", str(secret), str(mine / "base.raw"), check=True)
    made = other_user.run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw",
                          str(mine / "tip2.qcow2"), "4M")
    assert made.returncode == 0, made.stderr
    _refused(repo_dir, mine / "tip.qcow2", repr(str(secret)), f"lies outside {mine}")
    _refused(repo_dir, mine / "tip2.qcow2", "'base.raw'", f"leads to {secret}")


def test_a_directory_swapped_between_check_and_open_leads_nowhere_else(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tip's directory is the user's to rename: swapped for a symlink to a
    directory of root's just after the backing path was checked to lie inside,
    the open used to follow it (the root was opened again by its path), and
    root's file of that name went into the backup. (A loop of
    renameat2(RENAME_EXCHANGE) against repeated imports does the same.)"""
    from engine.qcow2 import backing

    home = tmp_path / "home"
    vms = home / "vms"
    vms.mkdir(parents=True)
    (vms / "base.raw").write_bytes(b"the user's own disk\n" * 100)
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "base.raw").write_bytes(b"root only\n" * 100)
    confine = backing.Confinement.around(str(vms / "tip.qcow2"))
    real = os.path.realpath

    def swapped_after_check(path: str, *args: object, **kwargs: object) -> str:
        out = real(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).endswith("base.raw") and not vms.is_symlink():
            vms.rename(home / "vms.orig")
            vms.symlink_to(secret_dir)
        return out

    monkeypatch.setattr(backing.os.path, "realpath", swapped_after_check)
    try:
        fd = confine.open(str(vms / "base.raw"), str(vms / "tip.qcow2"), "base.raw")
    except Exception as e:  # refusing is as good as reading the user's own file
        assert "root only" not in str(e)
    else:
        try:
            assert os.pread(fd, 100, 0).startswith(b"the user's own disk")
        finally:
            os.close(fd)
    finally:
        confine.close()
    assert vms.is_symlink()  # the swap did happen


def test_a_raw_disk_whose_guest_wrote_a_qcow2_header_imports_as_raw_with_format(repo_dir: Path, tmp_path: Path) -> None:
    """The tip's format is told from its first bytes, and in a raw disk those
    are the guest's: a header naming another VM's disk in the same directory
    as its backing file made import read that disk into this device's
    backups. `--format raw` says what the tip is; nothing is guessed then."""
    images = tmp_path / "images"
    images.mkdir()
    other = images / "other-vm.img"
    other.write_bytes(b"another guest's data\n" * 1000 + bytes(4 * MiB - 21000))
    disk = images / "guest.img"
    header = tmp_path / "header.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "other-vm.img", "-F", "raw", str(header), "4M")
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
        f.write(header.read_bytes()[:65536])  # what the guest wrote at the start of its disk
    out = cli("import", repo_dir, "vm", disk, "--format", "raw").stdout.decode().splitlines()
    assert len(out) == 1 and out[0].endswith("(raw)"), out
    image = repo_dir / "devices" / "vm" / f"{out[0].split(chr(9))[0]}.qcow2"
    assert qemu_raw(image, tmp_path) == disk.read_bytes()


def test_the_tips_format_is_stated_never_guessed(tmp_path: Path) -> None:
    """A raw tip is imported only when the user says it is raw: its first
    bytes are its guest's, and they decide nothing."""
    repo_dir = tmp_path / "repo"
    cli("init", repo_dir)
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\xabguest data" * 1000 + bytes(MiB - 11000))
    proc = cli("import", repo_dir, "vm", raw, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "not a qcow2 image" in err and "--format raw" in err, err
    assert "vm" not in cli("device", "list", repo_dir).stdout.decode()
    cli("import", repo_dir, "vm", raw, "--format", "raw")
    (backup_id,) = [line.split("\t")[0] for line in cli("list", repo_dir, "vm").stdout.decode().splitlines()[1:]]
    out = tmp_path / "out.raw"
    cli("restore", repo_dir, "vm", backup_id, out)
    assert out.read_bytes() == raw.read_bytes()
