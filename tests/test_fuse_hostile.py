"""A mounted filesystem serving damaged images, and hostile trigger input.

Whatever is wrong with one image, the request that touches it fails (EIO),
and everything else keeps working: other backups, the device, listings.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import cli, sh
from tests.mounts import Mounted

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Mounted, list[str]]]:
    src = tmp_path / "vm1.img"
    rng = random.Random(3)
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        for _ in range(8):
            f.seek(rng.randrange(0, 15 * MiB))
            f.write(rng.randbytes(rng.randrange(4 * KiB, 512 * KiB)))
    m = _mounted(tmp_path, src)
    try:
        yield m, _take_backups(m, 3, "64k", 2, 30)
    finally:
        m.cleanup()


def _mounted(tmp_path: Path, src: Path) -> Mounted:
    """A repository with device vm1 on ``src``, mounted at tmp_path/mnt."""
    cli("init", tmp_path / "repo")
    cli("device", "add", tmp_path / "repo", "vm1", src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "repo", tmp_path / "mnt")
    m.start()
    return m


def _take_backups(m: Mounted, count: int, bs: str, blocks: int, stride: int) -> list[str]:
    """A full, then incrementals, each after a write through the device; the ids, oldest first."""
    for i in range(count):
        sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs={bs} count={blocks} seek={i * stride} "
           "conv=notrunc status=none")
        sh(f"echo {'full' if i == 0 else 'incremental'} > {m.path('vm1', 'snapshot')}")
    return sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")


def _image(m: Mounted, backup_id: str) -> Path:
    return m.repo / "devices" / "vm1" / f"{backup_id}.qcow2"


def _still_serving(m: Mounted, good: str) -> None:
    sh(f"cmp {m.path('vm1', 'backups', good)} {m.path('vm1', 'backups', good)}")
    assert sorted(os.listdir(m.path("vm1"))) == ["backups", "bitmap", "chain", "changes", "device", "files",
                                                 "snapshot", "versions"]
    with open(m.path("vm1", "device"), "rb") as f:
        assert len(f.read(MiB)) == MiB
    assert "granularity" in m.path("vm1", "bitmap").read_text()


@pytest.mark.parametrize(
    "damage",
    ["l1-beyond-eof", "bad-magic", "l2-misaligned", "backing-loop", "truncated"],
)
def test_a_damaged_image_fails_alone(damage: str, chain: tuple[Mounted, list[str]]) -> None:
    m, ids = chain
    full, middle, last = ids
    damaged = last if damage == "backing-loop" else middle
    image = _image(m, damaged)
    raw = bytearray(image.read_bytes())
    if damage == "l1-beyond-eof":
        struct.pack_into(">Q", raw, 40, len(raw) * 4 // 65536 * 65536)
    elif damage == "bad-magic":
        raw[0:4] = b"XXXX"
    elif damage == "l2-misaligned":
        l1_offset = struct.unpack_from(">Q", raw, 40)[0]
        entry = struct.unpack_from(">Q", raw, l1_offset)[0]
        struct.pack_into(">Q", raw, l1_offset, entry | 0x200)  # an L2 offset off the cluster grid
    elif damage == "backing-loop":
        name = f"{last}.qcow2".encode()
        offset, size = struct.unpack_from(">QI", raw, 8)
        assert size == len(name)
        raw[offset : offset + size] = name  # the image names itself as its backing file
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    image.write_bytes(bytes(raw))
    # Everything that reads through the damaged image fails with EIO...
    for victim in [b for b in (middle, last) if b >= damaged]:
        with pytest.raises(OSError) as info:
            with open(m.path("vm1", "backups", victim), "rb") as f:
                while f.read(1 * MiB):
                    pass
        assert info.value.errno == errno.EIO, (victim, info.value)
    # ...and the rest of the tree keeps working.
    _still_serving(m, full)
    sh(f"echo incremental empty=1 > {m.path('vm1', 'snapshot')}", check=False)  # may fail: its parent is damaged
    _still_serving(m, full)
    log = m.log()
    assert "Traceback" not in log, log


def test_trigger_input_cannot_escape(chain: tuple[Mounted, list[str]]) -> None:
    m, ids = chain
    for line, expect in [
        ("verify backup=../../../etc/passwd", "no backup"),
        ("prune remove=../../catalog.db", "has no backup"),
        ("prune remove=/etc/passwd", "has no backup"),
    ]:
        proc = sh(f"echo '{line}' > {m.path('vm1', 'snapshot')}", check=False)
        assert proc.returncode != 0
        assert expect in m.path("vm1", "snapshot").read_text()
    sh(f"echo 'incremental empty=1 label=../../etc/x' > {m.path('vm1', 'snapshot')}")
    newest = sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")[-1]
    label = sh(f"getfattr -n user.backupfs.label --only-values {m.path('vm1', 'backups', newest)}").stdout
    assert label == "../../etc/x"
    assert sorted(os.listdir(m.repo / "devices")) == ["vm1"]
    assert not Path("/etc/x").exists()
    assert len(os.listdir(m.path("vm1", "backups"))) == len(ids) + 2  # + the new one + latest


def test_idle_chains_give_way_when_descriptors_run_out(tmp_path: Path) -> None:
    """Each open backup holds a descriptor per image of its chain, and up to
    8 views stay open after their readers leave. Under a low `ulimit -n`
    those idle views made the next open of a sound backup fail with EIO
    (damage, by the README). They are closed first now; only a reader that
    truly cannot get descriptors gets an error, EMFILE, never EIO."""
    src = tmp_path / "vm1.img"
    src.write_bytes(random.Random(7).randbytes(4 * MiB))
    m = _mounted(tmp_path, src)
    try:
        _take_backups(m, 25, "4k", 1, 7)
        m.stop()
        m = Mounted(tmp_path / "repo", tmp_path / "mnt", nofile=128)
        m.start()
        ids = sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")
        assert len(ids) == 25
        for backup_id in reversed(ids):  # 25 + 24 + 23 + ... descriptors held idle
            raw = tmp_path / "expected.raw"
            sh(f"qemu-img convert -O raw {_image(m, backup_id)} {raw}")
            sh(f"cmp {m.path('vm1', 'backups', backup_id)} {raw}")
        assert "closed the idle chain views" in m.log()
        # More than the limit at once: the one that cannot get descriptors
        # is told so, and the mount goes on serving.
        held = []
        try:
            with pytest.raises(OSError) as caught:
                for backup_id in reversed(ids):  # 25 + 24 + ... passes 128 within 6
                    held.append(open(m.path("vm1", "backups", backup_id), "rb"))
            assert caught.value.errno == errno.EMFILE and 2 <= len(held) <= 6
        finally:
            for f in held:
                f.close()
        _still_serving(m, ids[-1])
        m.stop()
    finally:
        m.cleanup()
