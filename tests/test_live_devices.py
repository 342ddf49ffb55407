"""`device add`, `device remove` and `import` while the repository is mounted.

The daemon holds the repository, so the CLI asks it through MOUNT/.control;
the change must show in the mount at once (the kernel keeps a device's
directory entry and attributes for an hour: a removal must drop them), a
removal must wait for jobs and open files and say which, and only the
mount's owner may use the file, whatever allow_other lets in.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backupfs.control import ControlError, DeviceAdd, DeviceRemove, Import, parse_control
from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted, mounted_device
from tests.oracle import qemu_img, qemu_io, qemu_raw
from tests.users import OtherUser

MiB = 1024 * 1024


def _disk(path: Path, size: int, seed: int) -> bytes:
    data = bytearray(size)
    data[MiB : 2 * MiB] = bytes([seed]) * MiB
    data[size - 4096 :] = os.urandom(4096)
    path.write_bytes(data)
    return bytes(data)


# -- the grammar (no mount) -------------------------------------------------------------


def test_control_lines_round_trip_and_refuse_what_they_must() -> None:
    odd = "/srv/disks/it's a \"disk\" $(x).img"
    for cmd in (DeviceAdd("vm2", odd, 65536, raw=True), DeviceAdd("vm2", "/d", replace=True),
                DeviceRemove("vm2", force=True), DeviceRemove("a.b_c-d"),
                Import("old", odd, source="/dev/sdb", granularity=4096, allow_outside=("/a b", "/c"),
                       backing_format="raw", tip_format="raw", raw=True), Import("old", "/t.qcow2")):
        assert parse_control((cmd.line() + "\n").encode()) == cmd
    for bad, says in (
        (b"device-add vm2 disk.img", "not an absolute path"),
        (b"import old /t.qcow2 source=rel.img", "not an absolute path"),
        (b"device-add ../x /d.img", "invalid device name"),
        (b"device-add .control /d.img", "invalid device name"),
        (b"device-remove vm2\ndevice-remove vm1\n", "one command per write"),
        (b"device-remove vm2 force=1 force=1", "given twice"),
        (b"device-remove vm2 recursive=1", "unknown option"),
        (b"rm -rf /", "unknown command"),
        (b"device-add vm2", "needs NAME SOURCE"),
        (b"device-add vm2 /d granularity=64K", "number of bytes"),
        (b"import old /t format=vmdk", "accepted: raw, qcow2"),
        (b"device-add vm2 '/d", "cannot parse"),
        (b"\xff\n", "not UTF-8"),
        (b"device-remove " + b"x" * 70000, "too long"),
    ):
        with pytest.raises(ControlError, match=says):
            parse_control(bad if bad.endswith(b"\n") or says == "too long" else bad + b"\n")
    with pytest.raises(ControlError, match="ending in a newline"):  # a write the kernel cut in two
        parse_control(b"device-remove vm2")


# -- through a real mount ---------------------------------------------------------------


@pytest.mark.mount
def test_a_device_added_and_removed_while_mounted(tmp_path: Path) -> None:
    with mounted_device(tmp_path, bytes(4 * MiB)) as m:
        src = tmp_path / "vm2.img"
        data = _disk(src, 8 * MiB, 0x5A)
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("vm2"))  # looked up before it exists: nothing stale may stay
        out = cli("device", "add", m.repo, "vm2", src).stdout.decode()
        assert out == f"device vm2: {src}, 8 MiB, granularity 64 KiB (through the mount at {m.mnt})\n"
        assert sorted(os.listdir(m.mnt)) == ["vm1", "vm2"]
        assert os.stat(m.path("vm2", "device")).st_size == 8 * MiB
        sh(f"printf 'hello' | dd of={m.path('vm2', 'device')} bs=4096 seek=100 conv=notrunc status=none")
        sh(f"echo full > {m.path('vm2', 'snapshot')}")
        expected = bytearray(data)
        expected[100 * 4096 : 100 * 4096 + 5] = b"hello"
        assert m.path("vm2", "backups", "latest").read_bytes() == bytes(expected)

        # Held open (as a VM or a loop device would): refused, saying what and who.
        fd = os.open(m.path("vm2", "device"), os.O_RDONLY)
        try:
            proc = cli("device", "remove", m.repo, "vm2", "--force", check=False)
        finally:
            os.close(fd)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1, err
        assert f"device vm2 is in use in the mount: its device file is open by pid {os.getpid()} (" in err, err
        proc = cli("device", "remove", m.repo, "vm2", check=False)
        assert proc.returncode == 1 and b"has 1 backup; removing it deletes them all (use --force)" in proc.stderr

        os.stat(m.path("vm2"))  # the kernel now holds the entry and its attributes (an hour)
        out = cli("device", "remove", m.repo, "vm2", "--force").stdout.decode()
        assert out == f"removed device vm2 and its 1 backup (through the mount at {m.mnt})\n"
        assert os.listdir(m.mnt) == ["vm1"]
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("vm2"))
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("vm2", "device"))
        assert sorted(os.listdir(m.repo / "devices")) == ["vm1"]

        # The name again, another disk and size: nothing of the old one shows.
        other = tmp_path / "other.img"
        _disk(other, 2 * MiB, 0x33)
        cli("device", "add", m.repo, "vm2", other)
        assert os.stat(m.path("vm2", "device")).st_size == 2 * MiB
        assert os.listdir(m.path("vm2", "backups")) == []
        assert "state: idle" in m.path("vm2", "snapshot").read_text()
        m.stop()


@pytest.mark.mount
def test_remove_waits_for_a_running_job(tmp_path: Path) -> None:
    with mounted_device(tmp_path, os.urandom(32 * MiB)) as m:
        snapshot = m.path("vm1", "snapshot")
        writer = subprocess.Popen(["bash", "-c", f"echo 'full rate=1M' > {snapshot}"])
        try:
            deadline = time.monotonic() + 30
            while json.loads(os.getxattr(snapshot, "user.backupfs.status"))["state"] != "running":
                assert time.monotonic() < deadline and writer.poll() is None
                time.sleep(0.05)  # polling for a state, not waiting a guessed time
            proc = cli("device", "remove", m.repo, "vm1", "--force", check=False)
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "device vm1 has a job running (full " in err, err
            assert f"requested by pid {writer.pid} (bash)" in err and "wait for it, or interrupt it" in err, err
        finally:
            writer.send_signal(signal.SIGTERM)
            writer.wait(60)
        assert json.loads(os.getxattr(snapshot, "user.backupfs.status"))["state"] == "cancelled"
        cli("device", "remove", m.repo, "vm1")  # no backup was made: no --force needed
        assert os.listdir(m.mnt) == []
        m.stop()


@pytest.mark.mount
def test_import_while_mounted(tmp_path: Path) -> None:
    chain = tmp_path / "chain"
    chain.mkdir()
    base, top = chain / "base.qcow2", chain / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x22 512k 1M")
    with mounted_device(tmp_path, bytes(4 * MiB)) as m:
        proc = cli("import", m.repo, "old", m.path("vm1", "device"), check=False)
        assert proc.returncode == 1 and b"lies on the backupfs mount at" in proc.stderr, proc.stderr
        lines = cli("import", m.repo, "old", top, cwd=tmp_path).stdout.decode().splitlines()
        assert [line.split("\t")[1] for line in lines] == ["full", "incremental"]
        assert sorted(os.listdir(m.mnt)) == ["old", "vm1"]
        assert m.path("old", "backups", "latest").read_bytes() == qemu_raw(top, tmp_path)
        assert os.readlink(m.path("old", "backups", "latest")) == lines[1].split("\t")[0]
        # What still waits for an unmount says how to do it.
        other = tmp_path / "mnt2"
        other.mkdir()
        proc = cli("mount", m.repo, other, check=False)
        assert proc.returncode == 1 and f"run 'backupfs umount {m.mnt}' first".encode() in proc.stderr, proc.stderr
        proc = cli("restore", m.repo, "vm1", "latest", m.src, "--force", check=False)
        assert proc.returncode == 1 and f"or run 'backupfs umount {m.mnt}' first".encode() in proc.stderr, proc.stderr
        m.stop()


@pytest.mark.mount
def test_the_control_file_is_the_mount_owners(tmp_path: Path, open_tmp: Path, other_user: OtherUser) -> None:
    src = open_tmp / "vm1.img"
    src.write_bytes(bytes(MiB))
    repo, mnt = tmp_path / "repo", open_tmp / "mnt"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    mnt.mkdir()
    m = Mounted(repo, mnt, options="allow_other")
    m.start()
    try:
        control = mnt / ".control"
        theirs = open_tmp / "theirs.img"
        theirs.write_bytes(bytes(MiB))
        os.chown(theirs, other_user.uid, other_user.gid)
        for attempt in (f"echo 'device-add x {theirs}' > {control}", f"echo 'device-remove vm1 force=1' > {control}",
                        f"cat {control}", f"getfattr -n user.backupfs.status {control}"):
            proc = other_user.run("sh", "-c", attempt)
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, (attempt, proc.stderr)
        assert other_user.run("ls", mnt).stdout.split() == ["vm1"]  # the devices alone are listed
        assert os.listdir(mnt) == ["vm1"]
        # The owner, by hand: a bad line is EINVAL, its reason read back from the same open file.
        fd = os.open(control, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"device-add x relative.img\n")
            assert e.value.errno == errno.EINVAL
            outcome = json.loads(os.pread(fd, 65536, 0))
        finally:
            os.close(fd)
        assert outcome["state"] == "failed" and outcome["errno"] == "EINVAL"
        assert "'relative.img' is not an absolute path" in outcome["error"], outcome
        assert "state: idle" in control.read_text()  # a refused line is no command
        m.stop()
    finally:
        m.cleanup()
    assert cli("device", "list", repo).stdout.decode().splitlines()[0].startswith("vm1\t")


@pytest.mark.mount
@pytest.mark.long
def test_an_interrupted_import_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C of `import` through the mount: the daemon stops before the next
    layer and removes what it wrote; the CLI says so on one line (exit 130)."""
    chain = tmp_path / "chain"
    chain.mkdir()
    base, mid, top = chain / "base.qcow2", chain / "mid.qcow2", chain / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "256M")
    qemu_io(base, "write -P 0x11 0 256M")  # layers that take a while to import
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    qemu_io(mid, "write -P 0x22 0 256M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x33 0 64k")
    with mounted_device(tmp_path, bytes(MiB)) as m:
        control = m.path(".control")
        proc = subprocess.Popen(backupfs_cmd() + ["import", str(m.repo), "big", str(top)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (json.loads(os.getxattr(control, "user.backupfs.status"))["progress"] or "").startswith(
                    "importing 1/3: "):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.02)  # polling for a state, not waiting a guessed time
            busy = cli("umount", m.mnt, check=False)  # the CLI holds the control file: it says why
            err = busy.stderr.decode()
            assert busy.returncode == 1 and f"import big {top} granularity=65536 (importing " in err, err
            assert f"requested by pid {proc.pid} (backupfs)" in err, err
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130 and out == b"", (out, err)
        assert err == b"backupfs: interrupted: the import of big was cancelled; nothing of it was kept\n", err
        status = control.read_text()
        assert "state: cancelled" in status and "received SIGINT" in status, status
        assert os.listdir(m.mnt) == ["vm1"] and sorted(os.listdir(m.repo / "devices")) == ["vm1"]
        m.stop()


def test_device_set_and_compress_in_control_lines() -> None:
    from backupfs.control import ControlError, DeviceAdd, DeviceSet, parse_control

    assert parse_control(b"device-set vm compress=zstd\n") == DeviceSet("vm", "zstd")
    assert parse_control(DeviceSet("vm", "none").line().encode() + b"\n") == DeviceSet("vm", "none")
    add = parse_control(b"device-add vm /dev/vg/vm compress=zstd\n")
    assert isinstance(add, DeviceAdd) and add.compress == "zstd"
    assert parse_control(add.line().encode() + b"\n") == add
    for bad in (b"device-set vm\n", b"device-set vm compress=lz4\n", b"device-add vm /x compress=gzip\n"):
        with pytest.raises(ControlError):
            parse_control(bad)
