"""`backupfs init | device | backup | list | status` from the shell, unmounted."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli
from tests.oracle import qemu_check, qemu_compare

MiB = 1024 * 1024


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "vm1.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(os.urandom(3 * MiB))
    return path


def test_init_add_backup_list(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    assert "initialised" in cli("init", repo).stdout.decode()
    out = cli("device", "add", repo, "vm1", src, "--granularity", "32K").stdout.decode()
    assert "vm1" in out and "32 KiB" in out
    full = cli("backup", repo, "vm1", "full")
    assert full.stderr == b""  # quiet in scripts: no progress bar
    with open(src, "r+b") as f:
        f.seek(8 * MiB)
        f.write(b"\x01" * 100)
    inc = cli("backup", repo, "vm1", "incremental", "--cluster-size", "128K", "--label", "nightly")
    assert "scanned" in inc.stdout.decode()  # the source changed behind our back
    lines = cli("list", repo, "vm1").stdout.decode().splitlines()
    assert lines[0].split("\t")[0] == "ID"
    ids = [line.split("\t")[0] for line in lines[1:]]
    assert len(ids) == 2 and ids[0].endswith("-0001-full") and ids[1].endswith("-0002-incremental")
    assert lines[2].split("\t")[3] == ids[0] and "nightly" in lines[2]
    i = ids[0]  # CREATED is UTC, marked so, like the id, `chain` and user.backupfs.created
    assert lines[1].split("\t")[4] == f"{i[0:4]}-{i[4:6]}-{i[6:8]}T{i[9:11]}:{i[11:13]}:{i[13:15]}Z", lines[1]
    image = repo / "devices" / "vm1" / f"{ids[1]}.qcow2"
    qemu_check(image)
    qemu_compare(image, src)
    status = cli("status", repo).stdout.decode()
    assert "vm1" in status and "bitmap: trusted" in status and ids[1] in status
    devices = cli("device", "list", repo).stdout.decode()
    assert devices.split("\t")[0] == "vm1"


def test_progress_bar_on_a_terminal(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    cmd = " ".join(shlex.quote(c) for c in backupfs_cmd() + ["backup", str(repo), "vm1", "full"])
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert "vm1 full" in proc.stdout and "B/s" in proc.stdout


@pytest.fixture(scope="module")
def error_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One repository for all the error cases: none of them changes it."""
    tmp = tmp_path_factory.mktemp("errors")
    src = tmp / "vm1.img"
    with open(src, "wb") as f:
        f.truncate(MiB)
    cli("init", tmp / "repo")
    cli("device", "add", tmp / "repo", "vm1", src)
    return tmp / "repo", src


@pytest.mark.parametrize(
    "args, message",
    [
        (["backup", "{repo}", "vm1", "incremental"], "no full backup yet"),
        (["backup", "{repo}", "nosuch", "full"], "no device named 'nosuch'"),
        (["backup", "{repo}", "vm1", "full", "--cluster-size", "3K"], "not a power of two"),
        (["backup", "{repo}", "vm1", "full", "--cluster-size", "4M"], "out of range"),
        (["device", "add", "{repo}", "../x", "{src}"], "invalid device name"),
        (["device", "add", "{repo}", "vm2", "{src}", "--granularity", "1G"], "out of range"),
        (["device", "add", "{repo}", "vm2", "/nonexistent"], "No such file"),
        (["device", "add", "{repo}", "vm1", "{src}"], "already exists"),
        (["list", "{repo}", "nosuch"], "no device named"),
        (["list", "{tmp}/notarepo"], "not a backupfs repository"),
        (["init", "{repo}"], "already a backupfs repository"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str, error_repo: tuple[Path, Path]) -> None:
    repo, src = error_repo
    argv = [a.format(repo=repo, src=src, tmp=repo.parent) for a in args]
    proc = cli(*argv, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert message in err and err.count("\n") == 1 and err.startswith("backupfs: error: ")


def test_repository_in_use(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    cli("init", repo)
    code = (
        "import sys\nfrom engine.repo import Repository\n"
        f"r = Repository.open({str(repo)!r})\nprint('ready', flush=True)\nsys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        proc = cli("device", "add", repo, "vm1", src, check=False)
        assert proc.returncode == 1
        err = proc.stderr.decode()
        # Who holds it, and what it runs (here: this test's interpreter).
        assert f"is in use by pid {holder.pid} ({os.path.basename(sys.executable)} -c import sys" in err, err
        # Looking needs no lock: list and status read beside the holder.
        assert cli("list", repo).stdout.decode().startswith("ID\t")
        out = cli("status", repo).stdout.decode()
        assert out.startswith(f"not mounted; in use by pid {holder.pid} ("), out
    finally:
        holder.kill()
        holder.wait()


def test_status_of_an_imported_archive_and_plainer_messages(tmp_path: Path, src: Path) -> None:
    """An imported chain with no live source has no bitmap: status said
    "qv: , 32 MiB" and "bitmap: unavailable", and exited 1."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("import", repo, "old", base)
    out = cli("status", repo).stdout.decode()
    assert "old: no live source (imported), 16 MiB" in out and "bitmap" not in out, out
    proc = cli("backup", repo, "old", "incremental", check=False)
    assert proc.returncode == 1
    cli("device", "add", repo, "vm1", src)
    proc = cli("backup", repo, "vm1", "incremental", check=False)
    assert proc.returncode == 1 and b"(or ask for auto_full=1 in the trigger, --auto-full to" in proc.stderr
    assert cli("verify", repo, "old").stdout.decode().splitlines()[-1].startswith("1 backup checked, 0 bad")


def test_an_imported_archive_gets_its_source_later(tmp_path: Path) -> None:
    """Imported without --source, an archive could never take a backup: the
    error said to import it with --source, which the existing name refused.
    `device add` now binds it; the next incremental scans, then equals the disk."""
    base, tip, disk = tmp_path / "base.qcow2", tmp_path / "tip.qcow2", tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(tip)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x22 4M 1M", str(tip)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tip), str(disk)], check=True)
    with open(disk, "r+b") as f:  # the disk went on after the archive's last image
        f.seek(8 << 20)
        f.write(b"\x33" * (1 << 20))
        f.seek(0)
        f.write(bytes(64 << 10))
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("import", repo, "vm", tip)
    proc = cli("backup", repo, "vm", "incremental", check=False)
    assert proc.returncode == 1 and f"with 'backupfs device add REPO vm SOURCE'".encode() in proc.stderr, proc.stderr
    # The wrong size or granularity is refused, and nothing changes.
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(8 << 20))
    proc = cli("device", "add", repo, "vm", small, check=False)
    assert proc.returncode == 1 and b"is 8388608 bytes but device vm's backups are 16777216" in proc.stderr
    proc = cli("device", "add", repo, "vm", disk, "--granularity", "128K", check=False)
    assert proc.returncode == 1 and b"leave out --granularity" in proc.stderr
    assert "vm: no live source (imported)" in cli("status", repo).stdout.decode()
    out = cli("device", "add", repo, "vm", disk).stdout.decode()
    assert "its imported backups go on from this source" in out, out
    status = cli("status", repo).stdout.decode()
    assert f"vm: {disk}, 16 MiB" in status and "untrusted (its backups were imported" in status, status
    proc = cli("device", "add", repo, "vm", disk, check=False)
    assert proc.returncode == 1 and b"already exists (its source is" in proc.stderr
    out = cli("backup", repo, "vm", "incremental").stdout.decode()
    assert "scanned" in out, out
    newest = cli("list", repo, "vm").stdout.decode().splitlines()[-1].split("\t")[0]
    image = repo / "devices" / "vm" / f"{newest}.qcow2"
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(disk)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    # Only what differs was copied: the 1 MiB written and the zeroed 64 KiB.
    info = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)
    own = sum(e["length"] for e in info if e["depth"] == 0 and (e["data"] or e["zero"]))
    assert own == (1 << 20) + (64 << 10), info
