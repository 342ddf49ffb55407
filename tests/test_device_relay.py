"""The device file served by the mount's C relay (backupfs/_relay.c, engine/_devio.c).

Ordinary tools write it (dd with O_DIRECT, many at once, as a VM's queue
does); the bitmap, the backups and the daemon's own count say the writes
went the C way and lost nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from backupfs.mountinfo import wait_for_exit
from tests.commands import cli
from tests.mounts import mounted_device

pytestmark = pytest.mark.mount

G = 64 * 1024
SIZE = 16 << 20


def served_in_c(log: str) -> int:
    found = re.findall(r"relay: (\d+) device requests served in C", log)
    assert found, log[-2000:]
    return int(found[-1])


def dd_write(device: Path, offset: int, data: bytes) -> subprocess.Popen[bytes]:
    """One dd writing ``data`` at ``offset`` with O_DIRECT (4 KiB aligned)."""
    proc = subprocess.Popen(["dd", f"of={device}", "bs=4096", f"seek={offset // 4096}", "oflag=direct",
                             "conv=notrunc", "status=none"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def test_parallel_small_writes_are_served_in_c_marked_exactly_and_backed_up(tmp_path: Path) -> None:
    rng = random.Random(24)
    granules = sorted(rng.sample(range(SIZE // G), 40))
    with mounted_device(tmp_path, bytes(SIZE)) as m:
        device = m.path("vm1", "device")
        (m.path("vm1", "snapshot")).write_text("full\n")
        expected = bytearray(SIZE)
        writers = []
        for g in granules:  # 4 KiB somewhere inside each chosen granule, all at once
            offset = g * G + rng.randrange(16) * 4096
            data = rng.randbytes(4096)
            expected[offset : offset + 4096] = data
            writers.append(dd_write(device, offset, data))
        assert all(p.wait(60) == 0 for p in writers)
        bitmap = json.loads(os.getxattr(m.path("vm1", "bitmap"), "user.backupfs.bitmap"))
        assert bitmap["trusted"] and bitmap["dirty_since_last"] == len(granules) * G
        (m.path("vm1", "snapshot")).write_text("incremental\n")
        latest = os.readlink(m.path("vm1", "backups", "latest"))
        assert m.path("vm1", "backups", latest).read_bytes() == bytes(expected)
        # What the bitmap marked is what the incremental stored: those granules, no other.
        image = m.repo / os.getxattr(m.path("vm1", "backups", latest), "user.backupfs.image").decode()
        extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                                            capture_output=True, text=True, check=True).stdout)
        stored = {e["start"] // G + k for e in extents if e["data"] and e["depth"] == 0
                  for k in range(e["length"] // G)}
        assert stored == set(granules)
        assert m.src.read_bytes() == bytes(expected)  # type: ignore[attr-defined]
        repo = m.repo
    # Each write went one way: C, or Python (an open of the device checks its
    # source under the gate, and a write meanwhile is declined to Python).
    python = re.findall(r"device vm1: (\d+) writes inline, (\d+) in threads", m.log())
    in_python = sum(map(int, python[-1])) if python else 0
    assert served_in_c(m.log()) + in_python == len(granules) and in_python < len(granules) // 2, (python, m.log())
    # The backup read above was served in the relay's threads, not passed to pyfuse3.
    reads = re.findall(r"(\d+) backup reads in its threads", m.log())
    assert reads and int(reads[-1]) >= SIZE // (1 << 20), m.log()[-2000:]
    listed = cli("list", repo, "vm1").stdout.splitlines()
    assert len(listed) == 3 and b"incremental" in listed[-1]  # a header, the full, the incremental


def test_a_program_writing_the_source_beside_the_mount_is_still_noticed(tmp_path: Path) -> None:
    """The C path declines a write once the source's time moved while none of
    ours was in flight; Python then distrusts the bitmap, as before."""
    with mounted_device(tmp_path, bytes(SIZE)) as m:
        device = m.path("vm1", "device")
        (m.path("vm1", "snapshot")).write_text("full\n")
        assert dd_write(device, 0, b"a" * 4096).wait(60) == 0  # served in C: the time is ours
        assert json.loads(os.getxattr(m.path("vm1", "bitmap"), "user.backupfs.bitmap"))["trusted"]
        with open(m.src, "r+b") as f:  # type: ignore[attr-defined]
            f.seek(5 * G)
            f.write(b"another program")
        st = os.stat(m.src)  # type: ignore[attr-defined]
        os.utime(m.src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # type: ignore[attr-defined]
        assert dd_write(device, 8 * G, b"b" * 4096).wait(60) == 0
        bitmap = json.loads(os.getxattr(m.path("vm1", "bitmap"), "user.backupfs.bitmap"))
        assert not bitmap["trusted"]
        assert "written by another program" in bitmap["untrusted_reason"]


def test_an_unmount_by_the_kernel_ends_the_daemon_cleanly(tmp_path: Path) -> None:
    """umount(8) from outside: the relay sees the connection end and the
    daemon stops as it did when pyfuse3 read the device itself."""
    with mounted_device(tmp_path, bytes(SIZE)) as m:
        assert dd_write(m.path("vm1", "device"), 0, b"c" * 4096).wait(60) == 0
        pid = m.pid
        subprocess.run(["umount", str(m.mnt)], check=True, timeout=60)
        assert pid is not None
        wait_for_exit(pid, 60)
        m.pid = None
        assert not (m.repo / "mount.json").exists()
    log = m.log()
    assert "unmounted" in log and "Traceback" not in log
    assert served_in_c(log) >= 1
