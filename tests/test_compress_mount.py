"""Compressed backups through the mount: the trigger's key, the device's
default, and the compressed image read back through the mount."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.commands import cli, sh
from tests.mounts import Mounted
from tests.oracle import qemu_check, qemu_compare
from tests.test_compress import compressed_share, make_mixed_source

MiB = 1024 * 1024

pytestmark = pytest.mark.mount


def _backups(m: Mounted, device: str) -> list[str]:
    return sorted(p for p in os.listdir(m.path(device, "backups")) if p != "latest")


def test_trigger_key_and_device_default(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = make_mixed_source(tmp_path / "vm.img", 16 * MiB, seed=31)
    cli("init", repo)
    cli("device", "add", repo, "vm", src, "--compress", "zstd")
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    try:
        m.start()
        snapshot = m.path("vm", "snapshot")
        images = repo / "devices" / "vm"

        def take(line: str) -> tuple[str, Path]:
            at = tmp_path / f"at-{len(_backups(m, 'vm'))}.raw"
            sh(f"cp --sparse=always {m.path('vm', 'device')} {at}")
            sh(f"echo {line} > {snapshot}")
            return _backups(m, "vm")[-1], at

        full, at_full = take("full")  # the device's default: zstd
        assert compressed_share(images / f"{full}.qcow2") > 0
        # Change it through the mount, then an incremental the trigger asks to store plain.
        rng = random.Random(1)
        with open(m.path("vm", "device"), "r+b", buffering=0) as f:
            for _ in range(5):
                f.seek(rng.randrange(0, 15 * MiB))
                f.write(b"changed through the mount\n" * 2000)
        plain, at_plain = take("incremental compress=none")
        assert compressed_share(images / f"{plain}.qcow2") == 0
        with open(m.path("vm", "device"), "r+b", buffering=0) as f:
            f.seek(3 * MiB)
            f.write(b"".join(b"line %d of a log\n" % rng.randrange(10**6) for _ in range(40000)))
        # `backupfs backup --compress` while mounted goes through the trigger too.
        out = cli("backup", repo, "vm", "incremental", "--compress", "zstd").stdout.decode()
        assert "through the mount" in out
        last = _backups(m, "vm")[-1]
        for ident, at in ((full, at_full), (plain, at_plain)):
            qemu_check(images / f"{ident}.qcow2")
            qemu_compare(images / f"{ident}.qcow2", at)
            # Read back through the mount, decompressing: the same bytes.
            sh(f"cmp {m.path('vm', 'backups', ident)} {at}")
        sh(f"cmp {m.path('vm', 'backups', last)} {m.path('vm', 'device')}")
        assert compressed_share(images / f"{last}.qcow2") > 0
        m.stop()
    finally:
        m.cleanup()


def test_device_add_and_set_compress_while_mounted(tmp_path: Path) -> None:
    """A device added with --compress through a mounted repository gets it,
    and `device set` changes the default through the mount: the next
    trigger's backup follows it, without a key of its own."""
    repo = tmp_path / "repo"
    src = make_mixed_source(tmp_path / "vm.img", 8 * MiB, seed=7)
    cli("init", repo)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt")
    try:
        m.start()
        out = cli("device", "add", repo, "vm", src, "--compress", "zstd").stdout.decode()
        assert "compress zstd" in out and "through the mount" in out
        sh(f"echo full > {m.path('vm', 'snapshot')}")
        images = repo / "devices" / "vm"
        first = _backups(m, "vm")[-1]
        assert compressed_share(images / f"{first}.qcow2") > 0
        out = cli("device", "set", repo, "vm", "--compress", "none").stdout.decode()
        assert "compress none" in out and "through the mount" in out
        listed = cli("device", "list", repo, "--json").stdout.decode()
        assert '"compress": "none"' in listed
        sh(f"echo full > {m.path('vm', 'snapshot')}")
        second = _backups(m, "vm")[-1]
        assert second != first and compressed_share(images / f"{second}.qcow2") == 0
        qemu_check(images / f"{second}.qcow2")
        qemu_compare(images / f"{second}.qcow2", src)
        m.stop()
    finally:
        m.cleanup()
