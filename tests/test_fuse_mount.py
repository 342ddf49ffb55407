"""The mounted filesystem, driven by ordinary tools from a subprocess.

Every test mounts with `backupfs mount` (the real daemon) and unmounts in
a finally, whatever happens; the daemon's log must show no traceback the
test did not ask for.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted, mounted_device
from tests.oracle import qemu_check, qemu_compare

pytestmark = pytest.mark.mount

KiB = 1024
MiB = 1024 * KiB


def _write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(30):
            off = rng.randrange(0, size - 300 * KiB) // 4096 * 4096
            f.seek(off)
            f.write(rng.randbytes(rng.randrange(4096, 300 * KiB)))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Mounted]:
    """A repository with one 64 MiB device `vm1`, mounted."""
    with mounted_device(tmp_path, lambda src: _write_random(src, 64 * MiB, 1)) as m:
        yield m


def trigger(m: Mounted, line: str, device: str = "vm1") -> subprocess.CompletedProcess:
    return sh(f"echo {line} > {m.path(device, 'snapshot')}", check=False)


def status(m: Mounted, device: str = "vm1") -> dict[str, str]:
    out = {}
    for line in m.path(device, "snapshot").read_text().splitlines():
        k, _, v = line.partition(": ")
        out[k] = v
    return out


def backups(m: Mounted, device: str = "vm1") -> list[str]:
    return sorted(p for p in os.listdir(m.path(device, "backups")) if p != "latest")


def snapshot_copy(m: Mounted, dest: Path) -> Path:
    """A copy of the device at this instant, read through the mount."""
    sh(f"cp --sparse=always {m.path('vm1', 'device')} {dest}")
    return dest


# -- the main job -------------------------------------------------------------------------


def _ext4_image(path: Path, files: dict[str, bytes], size_mb: int = 48) -> None:
    root = path.parent / (path.name + ".d")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    sh(f"mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0 -U clear -d {root} {path} {size_mb}M")


def test_ext4_full_incremental_restore(setup: Mounted, tmp_path: Path) -> None:
    m = setup
    dev = m.path("vm1", "device")
    rng = random.Random(5)
    v1 = {"report.txt": b"quarterly numbers\n" * 1000, "blob.bin": rng.randbytes(3 * MiB)}
    img1 = tmp_path / "fs1.img"
    _ext4_image(img1, v1)
    sh(f"dd if={img1} of={dev} bs=1M status=none conv=fsync")
    assert trigger(m, "full").returncode == 0
    copy1 = snapshot_copy(m, tmp_path / "at-full.raw")
    full_id = backups(m)[-1]

    # Change one file; write only the 4 KiB blocks that differ.
    v2 = dict(v1, **{"report.txt": b"revised numbers!!\n" * 1000, "new.txt": b"hello\n"})
    img2 = tmp_path / "fs2.img"
    _ext4_image(img2, v2)
    a, b = img1.read_bytes(), img2.read_bytes()
    changed = [i for i in range(0, len(b), 4096) if a[i : i + 4096] != b[i : i + 4096]]
    assert 0 < len(changed) < len(b) // 4096 // 4
    with open(dev, "r+b", buffering=0) as f:
        for off in changed:
            f.seek(off)
            f.write(b[off : off + 4096])
        os.fsync(f.fileno())
    assert trigger(m, "incremental cluster_size=128K").returncode == 0
    copy2 = snapshot_copy(m, tmp_path / "at-inc.raw")
    inc_id = backups(m)[-1]
    assert inc_id.endswith("-incremental") and inc_id > full_id

    sh(f"cmp {m.path('vm1', 'backups', full_id)} {copy1}")
    sh(f"cmp {m.path('vm1', 'backups', inc_id)} {copy2}")
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {copy2}")
    for backup_id in (full_id, inc_id):
        image = m.repo / "devices" / "vm1" / f"{backup_id}.qcow2"
        qemu_check(image)
    qemu_compare(m.repo / "devices" / "vm1" / f"{inc_id}.qcow2", copy2)

    # Restore a single file from last night's (the full) image: loop + mount.
    mnt = tmp_path / "restore"
    mnt.mkdir()
    loop = sh(f"losetup -r -f --show {m.path('vm1', 'backups', full_id)}").stdout.strip()
    try:
        sh(f"mount -o ro,noload {loop} {mnt}")
        try:
            assert (mnt / "report.txt").read_bytes() == v1["report.txt"]
            assert not (mnt / "new.txt").exists()
        finally:
            sh(f"umount {mnt}")
    finally:
        sh(f"losetup -d {loop}")
    # And from the incremental with fuse2fs, no loop device needed.
    try:
        sh(f"fuse2fs -o ro,fakeroot {m.path('vm1', 'backups', inc_id)} {mnt}")
        assert (mnt / "report.txt").read_bytes() == v2["report.txt"]
        assert (mnt / "new.txt").read_bytes() == b"hello\n"
        assert (mnt / "blob.bin").read_bytes() == v1["blob.bin"]
    finally:
        sh(f"fusermount3 -u {mnt}", check=False)


def test_listing_stat_du_xattrs(setup: Mounted) -> None:
    m = setup
    assert sorted(os.listdir(m.mnt)) == ["vm1"]
    assert sorted(os.listdir(m.path("vm1"))) == ["backups", "bitmap", "chain", "changes", "device", "files",
                                                 "snapshot", "versions"]
    assert os.listdir(m.path("vm1", "backups")) == []
    # `ls -a` shows . and .., and .. of each directory is its parent.
    assert sh(f"ls -a {m.path('vm1', 'backups')}").stdout.split() == [".", ".."]
    for d, parent in ((m.path("vm1", "backups"), m.path("vm1")), (m.path("vm1"), m.mnt)):
        inos = {e.name: e.inode() for e in os.scandir(d)}  # scandir leaves the dots out
        out = sh(f"ls -ai {d}").stdout.split()
        listed = dict(zip(out[1::2], map(int, out[0::2])))
        assert listed["."] == os.stat(d).st_ino and listed[".."] == os.stat(parent).st_ino
        assert {k: v for k, v in listed.items() if k not in (".", "..")} == inos
    assert trigger(m, "full").returncode == 0
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=64k count=2 seek=10 conv=notrunc status=none")
    assert trigger(m, "incremental cluster_size=128K label=nightly").returncode == 0
    full_id, inc_id = backups(m)
    assert os.readlink(m.path("vm1", "backups", "latest")) == inc_id

    listing = sh(f"ls -l {m.path('vm1', 'backups')}").stdout
    assert f"latest -> {inc_id}" in listing
    st = os.stat(m.path("vm1", "backups", inc_id))
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 == 2 * 64 * KiB  # what this image stores: 1 cluster of 128K
    assert st.st_blksize >= 1 * MiB
    assert not st.st_mode & 0o222
    full_st = os.stat(m.path("vm1", "backups", full_id))
    assert st.st_mtime >= full_st.st_mtime and abs(full_st.st_mtime - time.time()) < 300
    du = sh(f"du -k {m.path('vm1', 'backups', full_id)} {m.path('vm1', 'backups', inc_id)}").stdout.split()
    assert int(du[2]) == 128 and int(du[0]) == full_st.st_blocks // 2

    out = sh(f"getfattr -d {m.path('vm1', 'backups', inc_id)}").stdout
    attrs = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert attrs["user.backupfs.kind"] == '"incremental"'
    assert attrs["user.backupfs.parent"] == f'"{full_id}"'
    assert attrs["user.backupfs.cluster_size"] == '"131072"'
    assert attrs["user.backupfs.granularity"] == '"65536"'
    assert attrs["user.backupfs.stored_bytes"] == '"131072"'
    assert attrs["user.backupfs.image"] == f'"devices/vm1/{inc_id}.qcow2"'
    assert attrs["user.backupfs.created"].startswith('"20')
    assert attrs["user.backupfs.label"] == '"nightly"'

    chain = m.path("vm1", "chain").read_text().splitlines()
    assert chain[0].split()[:3] == ["ID", "KIND", "PARENT"]
    assert [line.split()[0] for line in chain[1:]] == [full_id, inc_id]
    assert chain[2].split()[2] == full_id
    bitmap = m.path("vm1", "bitmap").read_text()
    assert "granularity: 65536" in bitmap and "since last backup: 0 bytes dirty" in bitmap
    sh(f"dd if=/dev/zero of={m.path('vm1', 'device')} bs=512 count=1 seek=1 conv=notrunc status=none")
    assert "since last backup: 65536 bytes dirty in 1 runs, trusted" in m.path("vm1", "bitmap").read_text()
    st_dev = os.stat(m.path("vm1", "device"))
    assert st_dev.st_size == 64 * MiB and st_dev.st_mode & 0o777 == 0o600


def test_status_and_errors_of_the_trigger(setup: Mounted) -> None:
    m = setup
    assert status(m)["state"] == "idle"
    for line, what in [
        ("bogus", "unknown backup kind 'bogus'"),
        ("full cluster_size=3K", "not a power of two"),
        ("full colour=blue", "unknown key 'colour'"),
        ("full rate=1", "rate must be at least"),
    ]:
        proc = trigger(m, f"'{line}'")
        assert proc.returncode != 0
        st = status(m)
        assert st["state"] == "failed" and st["error"].startswith("EINVAL: ") and what in st["error"], st
        assert "accepted" in st["error"] or "at least" in st["error"]
    proc = sh(f"python3 -c \"import os; fd=os.open('{m.path('vm1', 'snapshot')}', os.O_WRONLY); "
              f"os.write(fd, b'full ' + b'x' * 5000)\"", check=False)
    assert "Invalid argument" in proc.stderr
    proc = trigger(m, "incremental")
    assert proc.returncode != 0 and "no full backup yet" in status(m)["error"]
    assert trigger(m, "'incremental auto_full=1'").returncode == 0
    st = status(m)
    assert st["state"] == "succeeded" and st["kind"] == "full" and st["backup"] == backups(m)[-1]


def test_backup_is_point_in_time_while_writers_run(setup: Mounted, tmp_path: Path) -> None:
    """Writes from another process during a running backup, read old backups,
    a second trigger gets EBUSY: the backup is the trigger-time device."""
    m = setup
    dev = m.path("vm1", "device")
    assert trigger(m, "full").returncode == 0
    first = backups(m)[0]
    first_copy = snapshot_copy(m, tmp_path / "first.raw")
    sh(f"dd if=/dev/urandom of={dev} bs=1M count=4 seek=20 conv=notrunc status=none")
    at_trigger = snapshot_copy(m, tmp_path / "trigger.raw")
    # 64 MiB at 8 MiB/s: the job runs ~8 s, long enough to write and read during it.
    job = subprocess.Popen(["bash", "-c", f"echo 'full rate=8M' > {m.path('vm1', 'snapshot')}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        # Running, then copying: between the two (planning, the free-space
        # check) the status says "progress: starting" and has no byte counts yet.
        st = status(m)
        while st["state"] != "running" or "bytes" not in st:
            assert job.poll() is None, "the job ended before it was seen copying"
            st = status(m)
        assert st["state"] == "running" and st["progress"] != "starting" and "bytes" in st
        # Another process writes all over the device while the job runs.
        writer = sh(
            f"for i in $(seq 0 40); do dd if=/dev/urandom of={dev} bs=64k count=1 "
            f"seek=$(( (i * 97) % 1000 )) conv=notrunc status=none; done; echo done"
        )
        assert writer.stdout.strip() == "done"
        busy = trigger(m, "incremental")
        assert busy.returncode != 0 and "Device or resource busy" in busy.stderr
        st = status(m)
        assert st["state"] == "running" and "%" in st["progress"]
        sh(f"cmp {m.path('vm1', 'backups', first)} {first_copy}")  # old backups still serve
        assert job.poll() is None, "the job finished before the writes; the test proved nothing"
    finally:
        job.wait(timeout=120)
    assert job.returncode == 0, job.stderr
    st = status(m)
    assert st["state"] == "succeeded" and int(st["copy-before-write clusters"]) > 0
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {at_trigger}")
    # No write was lost: the next incremental is the device now.
    assert trigger(m, "incremental").returncode == 0
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {snapshot_copy(m, tmp_path / 'now.raw')}")


def test_busy_message_names_the_job(setup: Mounted) -> None:
    m = setup
    job = subprocess.Popen(["bash", "-c", f"echo 'full rate=8M' > {m.path('vm1', 'snapshot')}"])
    try:
        while "bytes" not in status(m):
            assert job.poll() is None
        with pytest.raises(OSError) as info:
            os.open(m.path("vm1", "snapshot"), os.O_WRONLY)
        assert info.value.errno == errno.EBUSY
        st = status(m)
        assert st["command"].startswith("full") and st["state"] == "running" and "%" in st["progress"]
        proc = cli("backup", m.repo, "vm1", "incremental", check=False)
        assert proc.returncode == 1 and b"already running" in proc.stderr
    finally:
        job.wait(timeout=120)


def test_a_trigger_opened_before_the_job_and_written_during_it_is_busy(setup: Mounted) -> None:
    """Hooks that fire together all open the file before the first job
    starts; the kernel then holds each write back until the one before it
    returns. Each got through after the job and ran a backup of its own
    (8 writers: 6 fulls in a row). The job they waited behind is theirs:
    EBUSY. A writer that opens after it ends, or writes again on the file
    whose write ran it, is not held back."""
    m = setup
    snap = m.path("vm1", "snapshot")
    script = (
        f"exec 8>{snap}; "  # B opens first
        f"(echo 'full rate=16M' > {snap}) & "  # A's job: 64 MiB at 16 MiB/s
        # Polls the job's state (its xattr: no read of the file A is writing),
        # for a minute at most: a job missed fails the asserts below, not a hang.
        f"timeout 60 bash -c \"until getfattr --only-values -n user.backupfs.status {snap} 2>/dev/null "
        f"| grep -q '\\\"state\\\":\\\"running\\\"'; do :; done\"; "
        f"echo incremental >&8; echo \"B: $?\"; wait"
    )
    proc = sh(script, check=False)
    assert "Device or resource busy" in proc.stderr, proc.stderr
    assert "B: 1" in proc.stdout, proc.stdout
    assert len(backups(m)) == 1 and backups(m)[0].endswith("-full")
    st = status(m)
    assert st["state"] == "succeeded" and st["kind"] == "full", st
    assert "'incremental cluster_size=65536' waited for this job and was refused (EBUSY)" in st["refused"], st
    with open(snap, "w") as f:  # opened after the job: it runs, and writes again at once
        f.write("incremental empty=1\n")  # a backup each, though nothing changed
        f.flush()
        f.write("incremental empty=1\n")
        f.flush()
    assert len(backups(m)) == 3 and backups(m)[-1].endswith("-incremental")


def test_a_rejected_trigger_line_stays_one_line_of_the_status(setup: Mounted) -> None:
    """What was written is shown escaped: no text written to the trigger
    reads as a line of the status (a forged "state: succeeded")."""
    m = setup
    fd = os.open(m.path("vm1", "snapshot"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, b"x\nstate: succeeded\nbackup: forged\n")  # one write
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    text = m.path("vm1", "snapshot").read_text()
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("state:")] == ["state: failed"], text
    assert not any(ln.startswith("backup:") for ln in lines), text
    assert "command: x\\nstate: succeeded\\nbackup: forged" in text, text


def test_backups_are_read_only(setup: Mounted, tmp_path: Path) -> None:
    m = setup
    assert trigger(m, "full").returncode == 0
    bid = backups(m)[0]
    path = m.path("vm1", "backups", bid)
    before = snapshot_copy(m, tmp_path / "before.raw")
    sh(f"cmp {path} {before}")
    for cmd, expect in [
        (f"echo x > {path}", "Read-only file system"),
        (f"dd if=/dev/zero of={path} bs=4k count=1 conv=notrunc", "Read-only file system"),
        (f"truncate -s 0 {path}", "Read-only file system"),
        (f"rm -f {path}", "Read-only file system"),
        (f"mv {path} {m.path('vm1', 'backups', 'x')}", "Read-only file system"),
        (f"touch {m.path('vm1', 'backups', 'new')}", "Read-only file system"),
        (f"setfattr -n user.backupfs.kind -v full {path}", "Read-only file system"),
        (f"rm -f {m.path('vm1', 'chain')}", "Operation not permitted"),
        (f"echo x > {m.path('vm1', 'chain')}", "Permission denied"),
        (f"mkdir {m.path('x')}", "Operation not permitted"),
    ]:
        proc = sh(cmd, check=False)
        assert proc.returncode != 0 and expect in proc.stderr, (cmd, proc.stderr)
    sh(f"cmp {path} {before}")
    assert backups(m) == [bid]


def test_remount_keeps_the_bitmap(setup: Mounted, tmp_path: Path) -> None:
    m = setup
    assert trigger(m, "full").returncode == 0
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=4k count=1 seek=5000 conv=notrunc status=none")
    m.stop()
    m.start()
    assert "65536 bytes dirty in 1 runs, trusted" in m.path("vm1", "bitmap").read_text()
    assert trigger(m, "incremental").returncode == 0
    st = status(m)
    assert st["bytes stored"] == str(64 * KiB) and st["scanned"] == "no"
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {snapshot_copy(m, tmp_path / 'now.raw')}")


def test_sigkill_makes_the_next_incremental_scan(setup: Mounted, tmp_path: Path) -> None:
    m = setup
    assert trigger(m, "full").returncode == 0
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=4k count=3 seek=7000 conv=notrunc,fsync status=none")
    m.kill()
    m.start()
    bitmap = m.path("vm1", "bitmap").read_text()
    assert "untrusted (backupfs did not stop cleanly)" in bitmap
    assert trigger(m, "incremental").returncode == 0
    st = status(m)
    assert st["scanned"].startswith("yes") and st["bytes stored"] == str(64 * KiB)
    sh(f"cmp {m.path('vm1', 'backups', 'latest')} {snapshot_copy(m, tmp_path / 'now.raw')}")
    assert "trusted" in m.path("vm1", "bitmap").read_text()


def test_a_dead_mount_is_named_and_umount_clears_it(setup: Mounted) -> None:
    """After kill -9 of the daemon the mount point answers ENOTCONN; mounting
    again used to say "is not a directory"."""
    m = setup
    assert m.pid is not None
    os.kill(m.pid, 9)
    from backupfs.mountinfo import wait_for_exit

    wait_for_exit(m.pid, 60)
    m.pid = None
    proc = cli("mount", m.repo, m.mnt, check=False)
    assert proc.returncode == 1 and b"is a dead mount (its daemon is gone); run 'backupfs umount" in proc.stderr, \
        proc.stderr
    # Before the killed daemon is reaped, its record still names a live
    # process: a backup said "no device named 'vm1'".
    record = m.repo / "mount.json"
    saved = record.read_text()
    dying = subprocess.Popen(["sleep", "600"])
    try:
        record.write_text(json.dumps({**json.loads(saved), "pid": dying.pid}))
        proc = cli("backup", m.repo, "vm1", "incremental", check=False)
        assert proc.returncode == 1 and b"is a dead mount (its daemon, pid " in proc.stderr, proc.stderr
        proc = cli("status", m.repo, check=False)
        assert proc.returncode == 1 and b"a dead mount (its daemon is gone); run 'backupfs umount" in proc.stderr
    finally:
        dying.kill()
        dying.wait()
        record.write_text(saved)
    # The daemon gone for good (or a zombie not yet reaped, which still
    # answers kill(pid, 0)): status still names the dead mount.
    proc = cli("status", m.repo, check=False)
    said = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1 and "dead" in said and "(its daemon is gone)" in said, said
    assert f"run 'backupfs umount {m.mnt}'" in said, said
    cli("umount", m.mnt)
    assert cli("status", m.repo).stdout.startswith(b"not mounted\n")
    m.start()
    assert trigger(m, "full").returncode == 0


def test_cli_backup_goes_through_the_mount(setup: Mounted) -> None:
    m = setup
    out = cli("backup", m.repo, "vm1", "full", "--label", "from cli").stdout.decode()
    assert "through the mount" in out
    bid = backups(m)[-1]
    assert out.startswith(bid)
    lines = cli("list", m.repo).stdout.decode().splitlines()
    assert lines[1].split("\t")[0] == bid and "from cli" in lines[1]
    status_out = cli("status", m.repo).stdout.decode()
    assert f"mounted at {m.mnt}" in status_out and bid in status_out
    # The same history as unmounted: the latest backup and the last jobs.
    assert f"  latest backup: {bid}\n" in status_out and " full " in status_out and " succeeded" in status_out
    proc = cli("backup", m.repo, "vm1", "bogus-kind", check=False)
    assert proc.returncode == 2
    proc = cli("backup", m.repo, "nosuch", "full", check=False)
    assert proc.returncode == 1 and b"no device named 'nosuch'" in proc.stderr


@pytest.mark.parametrize(("args", "says"), [
    (("backup", "vm1", "full", "--label", "a\nb"), "label must be printable text"),
    (("backup", "vm1", "full", "--cluster-size", "3K"), "is not a power of two"),
    (("prune", "vm1"), "give either a retention rule or --remove ID"),
    (("prune", "vm1", "--keep-last", "0"), "--keep-last must be at least 1"),
    (("verify", "vm1", "--backup", "nope"), "no backup 'nope'"),
])
def test_cli_errors_read_the_same_mounted_or_not(setup: Mounted, args: tuple[str, ...], says: str) -> None:
    """Mounted, the CLI answered in the trigger file's words (keep_last='0',
    "one command per write", the whole grammar) and verify began with an
    empty line."""
    m = setup
    mounted = cli(args[0], m.repo, *args[1:], check=False)
    m.stop()
    unmounted = cli(args[0], m.repo, *args[1:], check=False)
    for proc in (mounted, unmounted):
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.startswith("backupfs: error: ") and says in err, err
        assert err.count("\n") == 1 and "accepted:" not in err and "EINVAL" not in err, err
        assert proc.stdout == b"", proc.stdout


def test_second_mount_and_mount_inside_repo_are_refused(setup: Mounted, tmp_path: Path) -> None:
    m = setup
    other = tmp_path / "mnt2"
    other.mkdir()
    proc = cli("mount", m.repo, other, check=False)
    assert proc.returncode == 1 and b"in use by pid" in proc.stderr
    inside = m.repo / "inside"
    inside.mkdir()
    proc = cli("mount", m.repo, inside, check=False)
    assert proc.returncode == 1 and b"inside the repository" in proc.stderr
    proc = cli("mount", m.repo, other, "-o", "bogus_option", check=False)
    assert proc.returncode == 1 and b"unknown mount option" in proc.stderr
    m.stop()  # not in use now: FUSE itself would have said only "fuse_session_new() failed"
    proc = cli("mount", m.repo, other, "-o", "noatime,allow_other=1", check=False)
    assert proc.returncode == 1 and b"mount option 'allow_other' takes no value" in proc.stderr, proc.stderr
    assert not os.path.ismount(other)


def test_private_unless_allow_other(setup: Mounted) -> None:
    m = setup
    proc = sh(f"setpriv --reuid=65534 --regid=65534 --clear-groups ls {m.mnt}", check=False)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_injected_fault_fails_one_request_only(tmp_path: Path) -> None:
    src = tmp_path / "vm1.img"
    _write_random(src, 8 * MiB, 2)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt", env={"BACKUPFS_TEST_FAULTS": "getxattr,read:chain"},
                expect_tracebacks=True)  # the injected faults are logged with theirs
    m.start()
    try:
        assert trigger(m, "full").returncode == 0
        bid = backups(m)[0]
        proc = sh(f"getfattr -n user.backupfs.kind {m.path('vm1', 'backups', bid)}", check=False)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr
        proc = sh(f"cat {m.path('vm1', 'chain')}", check=False)
        assert proc.returncode != 0 and "Input/output error" in proc.stderr
        # Everything else still works, and so does the same file kind elsewhere.
        sh(f"cmp {m.path('vm1', 'backups', bid)} {src}")
        assert "granularity" in m.path("vm1", "bitmap").read_text()
        assert sorted(os.listdir(m.path("vm1"))) == ["backups", "bitmap", "chain", "changes", "device", "files",
                                                     "snapshot", "versions"]
        m.stop()
    finally:
        m.cleanup()
    log = m.log()
    assert "injected fault in getxattr" in log and "injected fault in read" in log


@pytest.mark.parametrize("env, loop", [({}, "C"), ({"BACKUPFS_PURE_PYTHON": "1"}, "Python")])
def test_the_mount_says_once_which_read_loop_serves(tmp_path: Path, env: dict[str, str], loop: str) -> None:
    """The Python read loop is several times slower: a mount without the C
    build must say so in its log, once, and a mount with it must not."""
    src = tmp_path / "vm1.img"
    _write_random(src, 1 * MiB, 3)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    (tmp_path / "mnt").mkdir()
    m = Mounted(repo, tmp_path / "mnt", env=env)
    m.start()
    try:
        m.stop()
    finally:
        m.cleanup()
    said = [line for line in m.log().splitlines() if "read loop" in line]
    assert len(said) == 1 and f"by the {loop} read loop" in said[0], said


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_umount_waits_for_the_daemon(setup: Mounted) -> None:
    m = setup
    pid = m.pid
    sh(f"dd if=/dev/urandom of={m.path('vm1', 'device')} bs=4k count=1 conv=notrunc status=none")
    m.stop()
    assert pid is not None and not _alive(pid)
    assert not (m.repo / "mount.json").exists()
    # The bitmap was saved as cleanly closed, with the write in it.
    out = cli("status", m.repo).stdout.decode()
    assert "bitmap: trusted; dirty since last backup 64 KiB" in out




def test_foreground_mount_stops_cleanly_on_signals(tmp_path: Path) -> None:
    """`mount -f` serves until SIGINT/SIGTERM, then unmounts and saves the bitmaps."""
    import signal

    src = tmp_path / "vm1.img"
    _write_random(src, 8 * MiB, 3)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm1", src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(backupfs_cmd() + ["mount", "-f", str(repo), str(mnt)],
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # the daemon logs to stderr in the foreground
                if "serving" in line:
                    break
            else:
                pytest.fail("the foreground mount never became ready")
            sh(f"dd if=/dev/urandom of={mnt / 'vm1' / 'device'} bs=4k count=1 seek=100 conv=notrunc status=none")
            proc.send_signal(sig)
            rest = proc.stderr.read()
            assert proc.wait(timeout=60) == 0, rest
            assert "Traceback" not in rest and "bitmaps saved" in rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        assert not os.path.ismount(mnt)
        out = cli("status", repo).stdout.decode()
        assert "bitmap: trusted; dirty since last backup 64 KiB" in out


def test_read_ahead_is_raised_for_backups(setup: Mounted) -> None:
    """Buffered reads of backups arrive as 1 MiB requests, not 128 KiB."""
    from backupfs.mountinfo import READ_AHEAD_KB, find_mount

    m = setup
    assert trigger(m, "full").returncode == 0
    with open(m.path("vm1", "backups", "latest"), "rb") as f:
        f.read(4096)
    found = find_mount(str(m.mnt))
    assert found is not None
    assert Path(f"/sys/class/bdi/{found[1]}/read_ahead_kb").read_text().strip() == str(READ_AHEAD_KB)
