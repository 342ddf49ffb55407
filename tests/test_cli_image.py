"""`backupfs image ...` as a user runs it: a subprocess, QEMU as the oracle."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli
from tests.oracle import normalize_map, qemu_img, qemu_io, qemu_map, qemu_raw


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A three-image QEMU chain with different cluster sizes."""
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k", str(tmp_path / "base.qcow2"), "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 0x11 0 4M", "write -z 1M 1M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
             str(tmp_path / "mid.qcow2"), "4M")
    qemu_io(tmp_path / "mid.qcow2", "write -P 0x22 8k 4k", "write -c -P 0x23 2M 4k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=128k", "-b", "mid.qcow2", "-F", "qcow2",
             str(tmp_path / "top.qcow2"), "4M")
    qemu_io(tmp_path / "top.qcow2", "write -P 0x33 3M 128k")
    return tmp_path / "top.qcow2"


def test_info_shows_the_chain(chain: Path) -> None:
    out = cli("image", "info", chain).stdout.decode()
    images = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("image: ")]
    assert [Path(p).name for p in images] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert [line for line in out.splitlines() if line.startswith("cluster_size")] == [
        "cluster_size: 131072", "cluster_size: 4096", "cluster_size: 65536"]
    assert "virtual size: 4 MiB (4194304 bytes)" in out
    data = json.loads(cli("image", "info", "--output", "json", chain).stdout)
    assert data["chain-depth"] == 3
    assert [i["cluster-size"] for i in data["images"]] == [131072, 4096, 65536]
    assert data["images"][0]["data-bytes"] == 131072
    assert data["images"][1]["compressed-clusters"] == 1


def test_map_equals_qemu(chain: Path) -> None:
    lines = cli("image", "map", chain).stdout.decode().splitlines()
    ours = [json.loads(line) for line in lines]
    assert normalize_map(ours) == normalize_map(qemu_map(chain))


def test_cat_equals_qemu_convert_and_is_sparse(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        cli("image", "cat", chain, stdout=f)
    expected = qemu_raw(chain, tmp_path)
    assert out.read_bytes() == expected
    assert out.stat().st_blocks * 512 < len(expected)  # the zeroed MiB is a hole
    piped = subprocess.run(backupfs_cmd() + ["image", "cat", str(chain)], capture_output=True)
    assert piped.returncode == 0 and piped.stdout == expected


def test_cat_over_an_existing_file_writes_every_byte(chain: Path, tmp_path: Path) -> None:
    # `1<>` opens without truncating: skipping the zero regions as holes
    # would leave the old bytes there, a silently wrong image.
    out = tmp_path / "old.raw"
    expected = qemu_raw(chain, tmp_path)
    out.write_bytes(b"\xff" * (len(expected) + 4096))
    proc = subprocess.run(
        " ".join(backupfs_cmd()) + f" image cat {chain} 1<>{out}", shell=True, capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[: len(expected)] == expected
    assert data[len(expected) :] == b"\xff" * 4096  # like cat or dd conv=notrunc: the rest stays


def test_cat_into_a_closed_pipe_is_quiet(chain: Path) -> None:
    proc = subprocess.run(
        " ".join(backupfs_cmd()) + f" image cat {chain} | head -c 100 >/dev/null",
        shell=True, capture_output=True, text=True,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_cat_into_an_output_that_fails_says_so(chain: Path) -> None:
    """A full disk, or ext4's 16 TiB file limit: one line naming the
    output, the offset and the cause (it said "File too large" alone)."""
    with open("/dev/full", "wb") as full:
        proc = cli("image", "cat", chain, stdout=full.fileno(), check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.startswith("backupfs: error: writing the disk (") and "to standard output, at offset 0: " in err
    assert "No space left on device" in err and err.count("\n") == 1, err


def test_check_good_and_bad(chain: Path, tmp_path: Path) -> None:
    ok = cli("image", "check", chain)
    assert "No errors were found" in ok.stdout.decode()
    # Leak a cluster: append one and give it a refcount of 1.
    img = tmp_path / "leak.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 1 0 64k")
    raw = bytearray(img.read_bytes())
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, reftable)[0]
    nclusters = len(raw) // 65536
    struct.pack_into(">H", raw, block + 2 * nclusters, 1)
    raw += bytes(65536)
    img.write_bytes(bytes(raw))
    assert "1 leaked cluster" in subprocess.run(["qemu-img", "check", str(img)], capture_output=True,
                                                text=True).stdout
    bad = cli("image", "check", img, check=False)
    assert bad.returncode == 1
    assert "1 leaked clusters were found" in bad.stdout.decode()
    # A refcount of zero for a used cluster is an error, not a leak.
    struct.pack_into(">H", raw, block + 2 * (nclusters - 1), 0)
    img.write_bytes(bytes(raw))
    bad = cli("image", "check", img, check=False)
    assert bad.returncode == 1
    assert "refcount=0 reference=1" in bad.stdout.decode()


@pytest.mark.parametrize("name", ["s21", "s", "snap-1234", "abcdefgh"])
def test_check_of_internal_snapshots_agrees_with_qemu(name: str, tmp_path: Path) -> None:
    """QEMU pads snapshot table entries to 8 bytes only between entries:
    the last one, ending the file, made every such image read as corrupt."""
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", name, str(img))
    qemu_io(img, "write -P 2 0 64k")
    for _ in range(2):
        ok = cli("image", "check", img, check=False)
        assert ok.returncode == 0 and "No errors were found" in ok.stdout.decode(), ok.stdout.decode()
        qemu_img("snapshot", "-c", name + "x", str(img))  # then two entries: padding between them


@pytest.mark.parametrize("action", ["info", "map", "cat", "check"])
def test_errors_are_one_line(action: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    proc = cli("image", action, missing, check=False, stdout=subprocess.PIPE)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and str(missing) in err and "no such file" in err.lower()
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + struct.pack(">I", 9) + bytes(200))
    proc = cli("image", action, bad, check=False, stdout=subprocess.PIPE)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "unsupported qcow2 version 9" in err


def test_usage_errors_do_not_trace(tmp_path: Path) -> None:
    proc = cli("image", "frobnicate", check=False)
    assert proc.returncode == 2 and b"invalid choice" in proc.stderr
