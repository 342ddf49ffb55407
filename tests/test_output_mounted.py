"""status --json and verify --json on a mounted repository (their data comes
from the daemon's xattrs), and a prune through the mount turning an
incremental into a full in every place the mount shows a kind."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from engine.qcow2.layers import DATA, open_layer
from tests.commands import cli, sh
from tests.mounts import Mounted, mounted_device
from tests.oracle import qemu_check

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB


def _trigger(m: Mounted, line: str) -> None:
    fd = os.open(m.path("vm1", "snapshot"), os.O_WRONLY)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def _chain(m: Mounted, n: int) -> list[str]:
    """Full then incrementals, each after a write through the device file."""
    rng = random.Random(11)
    for i in range(n):
        with open(m.path("vm1", "device"), "r+b", buffering=0) as dev:
            dev.seek(i * MiB)
            dev.write(rng.randbytes(100 * KiB))
        _trigger(m, "full" if i == 0 else "incremental")
    return sorted(p for p in os.listdir(m.path("vm1", "backups")) if p != "latest")


def test_status_and_verify_json_through_the_mount(tmp_path: Path) -> None:
    with mounted_device(tmp_path, random.Random(1).randbytes(4 * MiB)) as m:
        ids = _chain(m, 3)
        with open(m.path("vm1", "device"), "r+b", buffering=0) as dev:
            dev.seek(3 * MiB)
            dev.write(b"\x02" * 10)  # one granule dirty since the last backup
        status = cli("status", m.repo, "--json")
        doc = json.loads(status.stdout)
        assert doc["mounted"] is True and doc["mountpoint"] == str(m.mnt) and doc["daemon_pid"] == m.pid
        (dev_doc,) = doc["devices"]
        assert dev_doc["error"] is None and dev_doc["latest_backup"] == ids[-1]
        assert dev_doc["bitmap"]["trusted"] is True and dev_doc["bitmap"]["dirty_since_last"] == 64 * KiB
        job = dev_doc["job"]  # the mount's last job: the third backup
        assert job["state"] == "succeeded" and job["result"]["backup"] == ids[-1]
        assert job["result"]["kind"] == "incremental" and job["started"].endswith("Z")
        assert isinstance(job["finished_ns"], int) and job["error"] is None

        good = cli("verify", m.repo, "--json")
        report = json.loads(good.stdout)
        assert report["ok"] is True and report["checked"] == ids and report["problems"] == []

        image = m.repo / "devices" / "vm1" / f"{ids[1]}.qcow2"
        with open_layer(str(image), "qcow2") as layer:
            guest, host = next((e.start, e.host) for e in layer.allocation() if e.kind == DATA)
        with open(image, "r+b") as f:
            f.seek(host + 5)
            f.write(b"\xba\xad")
        bad = cli("verify", m.repo, "vm1", "--json", check=False)
        assert bad.returncode == 1  # as the text verify through the mount
        report = json.loads(bad.stdout)
        assert report["ok"] is False and report["bad"] == ids[1:]
        assert report["problems"][0] == {"backup": ids[1], "problem": "stored data fails its checksum",
                                         "offset": guest - guest % (64 * KiB), "harms_reads": True,
                                         "inherited": False}
        assert report["advice"]  # what to do, through the mount too
        # Only the one backup: it reads through nothing damaged.
        one = json.loads(cli("verify", m.repo, "vm1", "--backup", "0001", "--json").stdout)
        assert one["ok"] is True and one["checked"] == [ids[0]]
        m.stop()
        # Unmounted, the same report.
        assert json.loads(cli("verify", m.repo, "vm1", "--json", check=False).stdout) == report
        unmounted = json.loads(cli("status", m.repo, "--json").stdout)
        assert unmounted["mounted"] is False and unmounted["devices"][0]["job"] is None
        assert unmounted["devices"][0]["bitmap"] == dev_doc["bitmap"]


def test_a_prune_through_the_mount_makes_the_child_a_full_everywhere(tmp_path: Path) -> None:
    with mounted_device(tmp_path, random.Random(2).randbytes(4 * MiB)) as m:
        ids = _chain(m, 3)
        child = m.path("vm1", "backups", ids[1])
        assert os.getxattr(child, "user.backupfs.kind") == b"incremental"
        cli("prune", m.repo, "vm1", "--remove", ids[0])
        assert os.getxattr(child, "user.backupfs.kind") == b"full"
        assert os.getxattr(child, "user.backupfs.parent") == b""
        chain = m.path("vm1", "chain").read_text().splitlines()
        assert chain[1].split()[:3] == [ids[1], "full", "-"]
        assert chain[2].split()[:3] == [ids[2], "incremental", ids[1]]
        rows = json.loads(cli("list", m.repo, "--json").stdout)
        assert [(r["id"], r["kind"]) for r in rows] == [(ids[1], "full"), (ids[2], "incremental")]
        fulls = cli("list", m.repo, "vm1", "--kind", "full").stdout.decode().splitlines()[1:]
        assert [line.split("\t")[0] for line in fulls] == [ids[1]]
        # A differential now starts from it: the new full is the last full.
        _trigger(m, "differential")
        newest = json.loads(cli("list", m.repo, "--json").stdout)[-1]
        assert newest["kind"] == "differential" and newest["parent"] == ids[1]
        assert "Traceback" not in m.log()
        image = m.repo / "devices" / "vm1" / f"{ids[1]}.qcow2"
        qemu_check(image)
        assert "backing file" not in sh(f"qemu-img info {image}").stdout  # a full in QEMU's eyes too

