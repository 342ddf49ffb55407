"""A hostile and a careless look at devices changed while mounted (MOUNT/.control)
and at the image-format check of sources: each test here is a finding of
that review, kept so that it stays fixed.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from backupfs.control import DeviceAdd, Import, parse_control
from engine.imageformat import PROBE_BYTES, format_of_head, image_format
from tests.commands import backupfs_cmd, cli
from tests.mounts import mounted_device
from tests.oracle import qemu_img, qemu_io

MiB = 1024 * 1024


# -- the grammar -----------------------------------------------------------------------------


def test_a_path_with_an_equals_sign_is_a_path() -> None:
    """`device add` and `import` take any absolute path unmounted; through the mount
    a SOURCE or TIP holding '=' was taken for a missing word ("needs NAME SOURCE")."""
    for cmd in (DeviceAdd("vm2", "/srv/disks/size=8G.img"), DeviceAdd("vm2", "/a=b/c", raw=True),
                Import("old", "/srv/vm=1/top.qcow2", source="/srv/x=y.img")):
        assert parse_control((cmd.line() + "\n").encode()) == cmd


# -- what a raw disk may hold --------------------------------------------------------------


def _vhd_footer(disk_size: int) -> bytes:
    """A fixed VHD's footer, as the VHD specification lays it out, checksum included."""
    f = bytearray(512)
    f[0:8] = b"conectix"
    f[8:12] = struct.pack(">I", 2)  # features
    f[12:16] = struct.pack(">I", 0x00010000)  # version
    f[16:24] = struct.pack(">Q", 0xFFFFFFFFFFFFFFFF)  # data offset: none (fixed)
    f[28:32] = b"qemu"
    f[40:48] = struct.pack(">Q", disk_size)
    f[48:56] = struct.pack(">Q", disk_size)
    f[60:64] = struct.pack(">I", 2)  # disk type: fixed
    f[64:68] = struct.pack(">I", ~sum(f) & 0xFFFFFFFF)
    return bytes(f)


def test_raw_disks_that_only_look_like_an_image(tmp_path: Path) -> None:
    """A raw disk is refused only on a real signature, not on 8 or 4 bytes of chance:
    its last sector starting 'conectix' without a valid VHD footer, or 'QFI\\xfb'
    with a version no qcow has, is a disk."""
    size = 16 * MiB
    garbage = tmp_path / "tail.raw"
    with open(garbage, "wb") as f:
        f.truncate(size)
        f.seek(size - 512)
        f.write(b"conectix" + os.urandom(504))  # a guest's data that happens to end so
    fd = os.open(garbage, os.O_RDONLY)
    try:
        assert image_format(fd, size) is None
    finally:
        os.close(fd)
    assert format_of_head(b"QFI\xfb" + b"\0" * 4 + os.urandom(PROBE_BYTES - 8)) is None  # version 0
    assert format_of_head(b"QFI\xfb" + struct.pack(">I", 0x7A11E4) + bytes(PROBE_BYTES - 8)) is None
    # The real ones still are: a footer whose checksum holds, qcow 1, qcow2 2 and 3.
    real = tmp_path / "fixed.vhd"
    with open(real, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(_vhd_footer(size))
    fd = os.open(real, os.O_RDONLY)
    try:
        assert image_format(fd, size + 512) == "VHD (fixed)"
    finally:
        os.close(fd)
    for version, named in ((1, "qcow"), (2, "qcow2"), (3, "qcow2")):
        assert format_of_head(b"QFI\xfb" + struct.pack(">I", version) + bytes(PROBE_BYTES - 8)) == named


@pytest.mark.parametrize("fmt,named", [("qed", "QED"), ("parallels", "Parallels")])
def test_qed_and_parallels_images_are_refused(tmp_path: Path, fmt: str, named: str) -> None:
    """qemu-img makes these too: as much a container as a qcow2 is."""
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(path), "16M")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert image_format(fd, os.fstat(fd).st_size) == named
    finally:
        os.close(fd)


# -- through a real mount ------------------------------------------------------------------------


@pytest.mark.mount
def test_a_source_path_with_an_equals_sign_through_the_mount(tmp_path: Path) -> None:
    with mounted_device(tmp_path, bytes(MiB)) as m:
        d = tmp_path / "size=2M"
        d.mkdir()
        src = d / "vm2.img"
        src.write_bytes(bytes(2 * MiB))
        out = cli("device", "add", m.repo, "vm2", src).stdout.decode()
        assert out.startswith(f"device vm2: {src}, 2 MiB"), out
        assert sorted(os.listdir(m.mnt)) == ["vm1", "vm2"]
        m.stop()


@pytest.mark.mount
@pytest.mark.long
def test_a_second_command_is_refused_while_one_runs(tmp_path: Path) -> None:
    """The kernel runs one write of a file at a time: a second command's write
    waited, unkillable, in the kernel for the first to end (an import: minutes)
    and then ran; the daemon's EBUSY was never seen. Its open is refused instead,
    naming what runs, as a second trigger's open of a snapshot file is."""
    chain = tmp_path / "chain"
    chain.mkdir()
    base, top = chain / "base.qcow2", chain / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "512M")
    qemu_io(base, "write -P 0x11 0 512M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x22 0 64k")
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    with mounted_device(tmp_path, bytes(MiB)) as m:
        control = m.path(".control")
        proc = subprocess.Popen(backupfs_cmd() + ["import", str(m.repo), "big", str(top)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while json.loads(os.getxattr(control, "user.backupfs.status"))["state"] != "running":
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.02)  # polling for a state, not waiting a guessed time
            second = cli("device", "add", m.repo, "vm2", other, check=False, timeout=300)
            running = proc.poll() is None
            err = second.stderr.decode()
            assert second.returncode == 1 and running, (running, err)
            assert err.count("\n") == 1 and f"another repository command is running (import big {top}" in err, err
            assert f"requested by pid {proc.pid} (backupfs)" in err, err
            # By hand, as `echo ... > .control` does. The import may end in between
            # (it takes about a second): an open let in is wrong only while it still runs.
            try:
                fd = os.open(control, os.O_WRONLY | os.O_TRUNC)
            except OSError as e:
                assert e.errno == errno.EBUSY
            else:
                os.close(fd)
                state = json.loads(os.getxattr(control, "user.backupfs.status"))["state"]
                assert state != "running", "a second command's open was let in while one ran"
            text = control.read_text()  # reading is not refused
            assert "state: " in text and "import big" in text, text
            out, err2 = proc.communicate(timeout=300)
            assert proc.returncode == 0, err2
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert sorted(os.listdir(m.mnt)) == ["big", "vm1"]
        m.stop()


@pytest.mark.mount
@pytest.mark.long  # about 10-20 s: four rebinds through the CLI beside two readers
def test_a_rebind_is_not_raced_by_a_reader(tmp_path: Path) -> None:
    """`device add --replace` while a script reads the device's bitmap file in
    a loop: a lookup or open of it (which renders the bitmap, so opens the
    device) that came between the daemon letting go of the old source and the
    catalog naming the new one opened the old source again, and kept it: the
    device file then wrote to the disk the device no longer has (or the two
    bitmap saves collided and the rebind failed)."""
    import threading

    with mounted_device(tmp_path, bytes(MiB)) as m:
        sources = [m.src, tmp_path / "b.img"]
        sources[1].write_bytes(bytes(MiB))
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    with open(m.path("vm1", "bitmap"), "rb") as f:
                        f.read()
                except OSError:
                    pass  # refused while the rebind runs: that is allowed
                time.sleep(0.002)  # a gap, for the rebind to find the device idle

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for n in range(1, 5):  # the race showed on the first round
                new = sources[n % 2]
                while True:  # refused while a read has the file open: try again
                    proc = cli("device", "add", m.repo, "vm1", new, "--replace", check=False)
                    if proc.returncode == 0:
                        break
                    assert b"is in use in the mount: " in proc.stderr, proc.stderr
                marker = f"rebind {n:04d}".encode()
                fd = os.open(m.path("vm1", "device"), os.O_WRONLY)
                try:
                    os.pwrite(fd, marker, 4096)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                with open(new, "rb") as f:
                    f.seek(4096)
                    assert f.read(len(marker)) == marker, f"rebind {n}: the write went to the old source"
        finally:
            stop.set()
            for t in threads:
                t.join()
        m.stop()


@pytest.mark.mount
def test_a_removal_is_not_raced_by_a_stat(tmp_path: Path) -> None:
    """`stat MOUNT/vm1/bitmap` (any `ls -l MOUNT/vm1`) renders the bitmap, which
    opens the device: one that came while vm1 was being removed opened its
    source again and kept it, so vm1 added again under that name wrote to
    the removed device's disk."""
    import threading

    with mounted_device(tmp_path, bytes(MiB)) as m:
        stop = threading.Event()

        def looker() -> None:
            while not stop.is_set():
                try:
                    os.stat(m.path("vm1", "bitmap"))
                except OSError:
                    pass

        for n in range(1, 7):
            new = tmp_path / f"new{n}.img"
            new.write_bytes(bytes(MiB))
            threads = [threading.Thread(target=looker) for _ in range(2)]
            for t in threads:
                t.start()
            try:
                cli("device", "remove", m.repo, "vm1")
            finally:
                stop.set()
                for t in threads:
                    t.join()
                stop.clear()
            cli("device", "add", m.repo, "vm1", new)
            marker = f"added {n:04d}".encode()
            fd = os.open(m.path("vm1", "device"), os.O_WRONLY)
            try:
                os.pwrite(fd, marker, 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            with open(new, "rb") as f:
                f.seek(4096)
                assert f.read(len(marker)) == marker, f"add {n}: the write went to another disk"
        m.stop()


@pytest.mark.mount
def test_a_source_with_a_line_break_in_its_name(tmp_path: Path) -> None:
    """A path may hold a newline; one line to the control file cannot. Said as
    that, not as the grammar's 'one command per write' about a line the user
    never wrote."""
    with mounted_device(tmp_path, bytes(MiB)) as m:
        src = tmp_path / "odd\nname.img"
        src.write_bytes(bytes(MiB))
        proc = cli("device", "add", m.repo, "vm2", src, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1, err
        assert "holds a line break" in err and f"backupfs umount {m.mnt}" in err, err
        assert os.listdir(m.mnt) == ["vm1"]
        m.stop()


@pytest.mark.mount
def test_a_source_on_the_mount_by_another_path(tmp_path: Path) -> None:
    """The mount reached by another path than its mount point (here a bind
    mount of it; an attacker's directory swapped for a link between the
    daemon's path check and its open does the same): the daemon opened its
    own device file as the new device's source under a lock that file's open
    needs, and the whole mount hung for good (its daemon could not even be
    killed). Refused by the file's identity now, for add and import."""
    alias = tmp_path / "alias"
    alias.mkdir()
    with mounted_device(tmp_path, bytes(MiB)) as m:
        subprocess.run(["mount", "--bind", str(m.mnt), str(alias)], check=True)
        try:
            for args in (("device", "add", m.repo, "vm2", alias / "vm1" / "device"),
                         ("device", "add", m.repo, "vm2", alias / "vm1" / "device", "--raw")):
                proc = cli(*args, check=False, timeout=60)
                err = proc.stderr.decode()
                assert proc.returncode == 1 and "lies on this repository's own backupfs mount" in err, err
            chain = tmp_path / "chain"
            chain.mkdir()
            qemu_img("create", "-q", "-f", "qcow2", str(chain / "base.qcow2"), "1M")
            proc = cli("import", m.repo, "old", chain / "base.qcow2", "--source", alias / "vm1" / "device",
                       check=False, timeout=60)
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "lies on this repository's own backupfs mount" in err, err
            assert os.listdir(m.mnt) == ["vm1"]
            assert os.stat(m.path("vm1", "device")).st_size == MiB  # still answering
        finally:
            subprocess.run(["umount", str(alias)], check=True)
        m.stop()


def test_an_import_reads_no_image_on_the_mounts_own_filesystem(tmp_path: Path) -> None:
    """An import through the daemon whose tip or backing file lies on the
    mount (reached by a path the path checks cannot see: --allow-outside of
    a directory holding a bind mount of it) would make the daemon read
    through itself. The repository knows the mount's filesystem
    (``mount_dev``): an image there is refused, whatever path led to it.
    Here the chain's own filesystem stands in for the mount's."""
    from engine.errors import BackupfsError
    from engine.repo import Repository

    chain = tmp_path / "chain"
    chain.mkdir()
    qemu_img("create", "-f", "qcow2", str(chain / "base.qcow2"), "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(chain / "top.qcow2"))
    Repository.init(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo")) as repo:
        repo.mount_dev = os.stat(chain).st_dev
        with pytest.raises(BackupfsError) as info:
            repo.import_chain("vm", str(chain / "top.qcow2"))
        assert "lies on the repository's own mount" in str(info.value)
        assert repo.device_record("vm") is None and not repo.catalog.intents()
        # A backing file there, the tip elsewhere: refused as well.
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            assert os.stat(shm).st_dev != os.stat(chain).st_dev
            qemu_img("create", "-f", "qcow2", str(shm / "base.qcow2"), "1M")
            qemu_img("create", "-f", "qcow2", "-b", str(shm / "base.qcow2"), "-F", "qcow2", str(chain / "tip.qcow2"))
            repo.mount_dev = os.stat(shm).st_dev
            with pytest.raises(BackupfsError) as info:
                repo.import_chain("vm", str(chain / "tip.qcow2"), allow_outside=[str(shm)])
            assert "lies on the repository's own mount" in str(info.value) and "base.qcow2" in str(info.value)
        finally:
            shutil.rmtree(shm)
        repo.mount_dev = None  # the same chain elsewhere: imported
        assert [r.kind for r in repo.import_chain("vm", str(chain / "top.qcow2"))] == ["full", "incremental"]
