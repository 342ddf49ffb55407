"""Read-ahead advice follows the disk's own read-ahead, on a real loop-mounted ext4."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import chain
from engine.chain import ChainView
from engine.qcow2.writer import Qcow2Writer
from engine.readahead import kernel_read_ahead

from tests.commands import sh

MiB = 1024 * 1024


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(mounted directory, /sys/block/loopN/queue/read_ahead_kb) of a fresh ext4."""
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(96 * MiB)
    sh(f"mkfs.ext4 -q -F {backing}")
    loop = sh(f"losetup -f --show {backing}").stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        sh(f"mount {loop} {mnt}")
        try:
            yield mnt, f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb"
        finally:
            sh(f"umount {mnt}")
    finally:
        sh(f"losetup -d {loop}")


def _set(knob: str, kib: int) -> None:
    with open(knob, "w") as f:
        f.write(str(kib))


@pytest.mark.mount
def test_read_ahead_is_read_from_the_disk_each_time(loop_fs: tuple[Path, str], tmp_path: Path) -> None:
    mnt, knob = loop_fs
    (mnt / "f").write_bytes(b"x")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        _set(knob, 8192)
        assert kernel_read_ahead(fd) == 8 * MiB
        _set(knob, 128)
        assert kernel_read_ahead(fd) == 128 * 1024  # retuned: seen at once
    finally:
        os.close(fd)
    shm = os.open("/dev/shm", os.O_RDONLY)
    try:
        assert kernel_read_ahead(shm) is None  # tmpfs: no block device behind it
    finally:
        os.close(shm)


@pytest.mark.mount
def test_advice_leaves_sequential_pieces_to_a_large_read_ahead(
    loop_fs: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, read_loop: str
) -> None:
    """A full under one small incremental: the full's pieces of a window are in
    file order; with the disk reading 8 MiB ahead by itself only the
    incremental's pieces get advice, with 128 KiB every piece does. Both
    loops (C and Python) advise the same runs, and advise() asks the kernel
    for exactly what advice() lists."""
    mnt, knob = loop_fs
    cs = 64 * 1024
    full = mnt / "full.qcow2"
    with Qcow2Writer(str(full), 32 * MiB, cs) as w:
        w.write(0, os.urandom(32 * MiB))
        w.commit()
    inc = mnt / "inc.qcow2"
    with Qcow2Writer(str(inc), 32 * MiB, cs, backing_file="full.qcow2", backing_format="qcow2") as w:
        for k in (3, 40, 41, 200):
            w.write(k * cs, os.urandom(cs))
        w.commit()

    def advised(kib: int) -> dict[str, int]:
        _set(knob, kib)
        with ChainView.open(str(inc)) as view:
            names = [os.path.basename(layer.path) for layer in view.layers]
            runs = view.advice(0, 16 * MiB)
            if read_loop == "python":
                calls: list[tuple[int, int, int]] = []
                monkeypatch.setattr(chain, "_willneed", lambda fd, off, n: calls.append((fd, off, n)))
                assert view.advise(0, 16 * MiB) == len(runs)
                fds = [layer.fd for layer in view.layers]
                assert sorted(calls) == sorted((fds[d], off, n) for d, off, n in runs)
            else:
                assert view.advise(0, 16 * MiB) == len(runs)
            out: dict[str, int] = {}
            for depth, _off, n in runs:
                out[names[depth]] = out.get(names[depth], 0) + n
            # What is advised is what the window needs, nothing more.
            assert sum(out.values()) <= 16 * MiB
            return out

    large = advised(8192)
    assert large == {"inc.qcow2": 4 * cs}  # clusters 3, 40, 41, 200 lie in the first 16 MiB
    small = advised(128)
    assert small["inc.qcow2"] == 4 * cs
    assert small["full.qcow2"] == 16 * MiB - 4 * cs


def test_the_c_advice_is_the_python_advice_on_a_deep_chain(tmp_path: Path) -> None:
    """Twelve layers of scattered clusters of different sizes: for windows
    that start and end anywhere, the C loop lists the runs Python does."""
    import random

    from engine import _fastread  # noqa: F401  (fails the test if not built)

    rng = random.Random(7)
    size = 24 * MiB + 4096
    paths = []
    for k in range(12):
        path = tmp_path / f"l{k}.qcow2"
        cs = (65536, 4096, 131072)[k % 3]
        backing = {"backing_file": paths[-1].name, "backing_format": "qcow2"} if paths else {}
        with Qcow2Writer(str(path), size, cs, **backing) as w:
            for _ in range(40 if paths else 200):
                c = rng.randrange(size // cs)
                w.write(c * cs, os.urandom(min(cs, size - c * cs)))
            w.commit()
        paths.append(path)
    with ChainView.open(str(paths[-1])) as view:
        for _ in range(50):
            off = rng.randrange(size)
            n = rng.choice((1, 4096, MiB, 16 * MiB, size))
            assert sorted(view.advice(off, n)) == sorted(view._advice_python(off, min(off + n, size)))
        assert view.advice(size, MiB) == [] and view.advise(size - 1, 0) == 0


@pytest.mark.mount
def test_a_mounted_backup_read_gets_its_advice_from_the_advisor_thread(tmp_path: Path) -> None:
    """A sequential read of a backup through the mount is advised on the
    advisor's thread (the daemon's log counts what it ran at unmount), and
    the reader, gone before its advice may be, still reads every byte right."""
    import re

    from tests.mounts import mounted_device

    data = os.urandom(24 * MiB)
    with mounted_device(tmp_path, data, "vm1") as m:
        sh(f"echo full > {m.path('vm1', 'snapshot')}")
        sh(f"echo incremental empty=1 > {m.path('vm1', 'snapshot')}")
        for _ in range(2):
            sh(f"cmp {m.path('vm1', 'backups', 'latest')} {m.src}")  # type: ignore[attr-defined]
            sh(f"dd if={m.path('vm1', 'backups', 'latest')} of=/dev/null bs=1M count=1 iflag=direct status=none")
        m.stop()
    counts = re.findall(r"read-ahead advice: (\d+) requests run, (\d+) dropped", m.log())
    assert counts, m.log()
    run, dropped = map(int, counts[-1])
    assert run >= 2 and dropped == 0, counts  # each sequential reader asks at least once
