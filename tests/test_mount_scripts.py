"""mount-scripts/: the fstab helper, the systemd units and the file-restore helper, run for real.

- mount.backupfs is called the way mount(8) calls it, then really through
  mount(8) (`mount -t fuse.backupfs`, and an fstab line with `mount -T`);
- the systemd units pass `systemd-analyze verify` (a structural check where
  systemd-analyze is missing), and their Exec lines are run as systemd would
  run them: start, a backup through the snapshot unit, SIGTERM, clean exit;
- backupfs-restore-file mounts partitions of real backups read-only, runs a
  command in them, waits for Enter or Ctrl-C, and always leaves no mount and
  no loop device behind.

Every test undoes what it set up in a finally: its mounts, its loop devices,
the processes it started, the helper symlink it installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupfs.mountinfo import wait_for_exit
from tests.commands import backupfs_cmd, cli, sh
from tests.mounts import Mounted
from tests.users import OtherUser

MiB = 1024 * 1024
SCRIPTS = Path(__file__).resolve().parent.parent / "mount-scripts"
MOUNT_HELPER = SCRIPTS / "mount.backupfs"
RESTORE = SCRIPTS / "backupfs-restore-file"
UNIT_BINARY = "/usr/local/bin/backupfs"
HOSTNAME = "restored-vm1\n"


# -- helpers ----------------------------------------------------------------------------


def mount_of(path: Path) -> tuple[str, str, str] | None:
    """(fstype, source, mount options) of what is mounted at ``path``, from mountinfo."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if fields[4].encode().decode("unicode_escape") == target:
                found = (rfields[0], rfields[1].encode().decode("unicode_escape"), fields[5])
    return found


def loops_under(prefix: Path) -> list[str]:
    """Loop devices whose backing file lies under ``prefix``."""
    out = []
    prefix_s = os.path.abspath(prefix) + os.sep
    for sysdir in Path("/sys/block").glob("loop*"):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix_s):
            out.append(f"/dev/{sysdir.name}: {backing}")
    return out


def backupfs_binary(tmp_path: Path) -> str:
    """One executable that is `backupfs` (for $BACKUPFS and the units' ExecStart)."""
    cmd = backupfs_cmd()
    if len(cmd) == 1:
        return cmd[0]
    wrapper = tmp_path / "backupfs-wrapper"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(c) for c in cmd) + ' "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def make_repo(tmp_path: Path, device: str = "d1", size: int = 8 * MiB) -> Path:
    src = tmp_path / f"{device}.img"
    with open(src, "wb") as f:
        f.truncate(size)
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("device", "add", repo, device, src)
    return repo


def mounted_by(repo: Path, mnt: Path) -> Mounted:
    """A Mounted for a mount some script made, so that its cleanup() applies."""
    m = Mounted(repo, mnt)
    try:
        m.pid = json.loads((repo / "mount.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        m.pid = None
    return m


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


# -- mount.backupfs ---------------------------------------------------------------------


def helper(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOUNT_HELPER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.mount
def test_helper_mounts_as_mount8_calls_it(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "BACKUPFS": backupfs_binary(tmp_path)}
    m = Mounted(repo, mnt)
    try:
        proc = helper(repo, mnt, "-n", "-o", "rw,_netdev,defaults,noauto,nofail,x-systemd.automount,comment=x",
                      "-t", "fuse.backupfs", env=env)
        assert proc.returncode == 0, proc.stderr
        m = mounted_by(repo, mnt)
        found = mount_of(mnt)
        assert found is not None and found[0] == "fuse.backupfs", found
        assert found[1] == str(repo)
        assert sorted(os.listdir(mnt)) == ["d1"]
        assert (mnt / "d1" / "device").stat().st_size == 8 * MiB
        m.stop()
        assert mount_of(mnt) is None
        assert not (repo / "mount.json").exists()
    finally:
        m.cleanup()


@pytest.mark.mount
def test_helper_options_and_binary_lookup(tmp_path: Path) -> None:
    """-f (fake) with -v shows what would run, and mounts nothing."""
    repo = make_repo(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    binary = backupfs_binary(tmp_path)
    env = {**os.environ, "BACKUPFS": binary}

    proc = helper(repo, mnt, "-fv", "-o",
                  "rw,_netdev,defaults,auto,noauto,user,users,nouser,nofail,x-systemd.requires=a.mount,"
                  "comment=systemd.automount,helper=foo,allow_other,noatime", env=env)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr) == f"mount.backupfs: {binary} mount -o rw,allow_other,noatime -- {repo} {mnt}"
    assert mount_of(mnt) is None

    # Nothing left for the filesystem: no -o at all. Options glued to their flag,
    # clustered flags, -N given as a pid, and the old `backupfs#REPO` source.
    proc = helper(f"backupfs#{repo}", mnt, "-sfnv", "-o_netdev,defaults", "-tfuse.backupfs", env=env)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr) == f"mount.backupfs: {binary} mount -- {repo} {mnt}"
    proc = helper(repo, mnt, "-fv", "-N", str(os.getpid()), env=env)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr).startswith(f"mount.backupfs: nsenter --mount=/proc/{os.getpid()}/ns/mnt -- {binary} mount")

    # Without $BACKUPFS: `backupfs` on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "backupfs").symlink_to(binary)
    env_path = {k: v for k, v in os.environ.items() if k != "BACKUPFS"}
    env_path["PATH"] = f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"
    proc = helper(repo, mnt, "-fv", env=env_path)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr) == f"mount.backupfs: {bindir}/backupfs mount -- {repo} {mnt}"

    # Neither: /usr/local/bin/backupfs, or a clear error (exit 32, mount failure).
    env_path["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    proc = helper(repo, mnt, "-fv", env=env_path)
    if shutil.which("backupfs", path=env_path["PATH"]):
        assert proc.returncode == 0, proc.stderr
    elif os.access(UNIT_BINARY, os.X_OK):
        assert proc.returncode == 0, proc.stderr
        assert one_line(proc.stderr).startswith(f"mount.backupfs: {UNIT_BINARY} mount")
    else:
        assert proc.returncode == 32, proc.stderr
        assert "cannot find the backupfs command" in one_line(proc.stderr)
    assert mount_of(mnt) is None


@pytest.mark.mount
def test_helper_bad_usage_and_failures(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "BACKUPFS": backupfs_binary(tmp_path)}
    try:
        for args in ([], [repo], [repo, mnt, "extra"], [repo, mnt, "-q"], [repo, mnt, "-o"]):
            proc = helper(*args, env=env)
            assert proc.returncode == 1, (args, proc.stderr)
            assert one_line(proc.stderr).startswith("mount.backupfs: usage: mount.backupfs REPOSITORY MOUNTPOINT")

        proc = helper(repo, mnt, env={**env, "BACKUPFS": str(tmp_path / "no-such-backupfs")})
        assert proc.returncode == 32
        assert "is not an executable backupfs command" in one_line(proc.stderr)

        # backupfs's own refusals come through as its one line, with mount(8)'s 32.
        proc = helper(tmp_path / "not-a-repo", mnt, env=env)
        assert proc.returncode == 32
        assert "is not a backupfs repository" in one_line(proc.stderr)
        proc = helper(repo, mnt, "-o", "_netdev,bogus", env=env)
        assert proc.returncode == 32
        assert "unknown mount option 'bogus'" in one_line(proc.stderr)
        proc = helper(repo, tmp_path / "no-such-dir", env=env)
        assert proc.returncode == 32
        assert "no-such-dir does not exist" in one_line(proc.stderr)
        assert mount_of(mnt) is None
    finally:
        m = mounted_by(repo, mnt)
        m.cleanup()


@pytest.fixture
def helper_installed() -> Iterator[Path]:
    """/sbin/mount.fuse.backupfs -> mount-scripts/mount.backupfs, for this test only.

    mount(8) looks for helpers in /sbin (and /sbin/fs.d, /sbin/fs). An
    existing file there is moved aside and put back afterwards.
    """
    link = Path("/sbin/mount.fuse.backupfs")
    saved = Path("/sbin/.mount.fuse.backupfs.saved-by-test")
    had = os.path.lexists(link)
    if had:
        os.replace(link, saved)
    try:
        link.symlink_to(MOUNT_HELPER)
    except OSError as e:
        if had:
            os.replace(saved, link)
        pytest.fail(f"cannot install {link} for the test: {e}")
    try:
        yield link
    finally:
        link.unlink(missing_ok=True)
        if had:
            os.replace(saved, link)


def _through_mount8(cmd: list[str], repo: Path, mnt: Path, env: dict[str, str]) -> None:
    """Mount with ``cmd`` (mount(8)), check, unmount with umount(8), wait for the daemon."""
    m = Mounted(repo, mnt)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        m = mounted_by(repo, mnt)
        found = mount_of(mnt)
        assert found is not None and found[0] == "fuse.backupfs" and found[1] == str(repo), found
        assert m.pid is not None
        assert (mnt / "d1" / "device").stat().st_size == 8 * MiB
        pid = m.pid
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert wait_for_exit(pid, 60), f"daemon {pid} still running after umount"
        m.pid = None
        assert mount_of(mnt) is None
        assert not (repo / "mount.json").exists()
        assert "unmounted" in m.log() and "bitmaps saved" in m.log()
    finally:
        m.cleanup()


@pytest.mark.mount
def test_mount8_and_fstab(tmp_path: Path, helper_installed: Path) -> None:
    repo = make_repo(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "BACKUPFS": backupfs_binary(tmp_path)}

    _through_mount8(["mount", "-t", "fuse.backupfs", "-o", "_netdev", str(repo), str(mnt)], repo, mnt, env)

    fstab = tmp_path / "fstab"
    # relatime, nofail: common in fstab lines, refused once ("unknown mount option").
    fstab.write_text(f"# test fstab\n{repo} {mnt} fuse.backupfs defaults,_netdev,relatime,nofail 0 0\n")
    _through_mount8(["mount", "-T", str(fstab), str(mnt)], repo, mnt, env)
    _through_mount8(["mount", "--fstab", str(fstab), str(repo)], repo, mnt, env)

    # A refusal reaches the user through mount(8), with the helper's status.
    m = Mounted(repo, mnt)
    try:
        proc = subprocess.run(["mount", "-t", "fuse.backupfs", "-o", "bogus", str(repo), str(mnt)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 32, proc.stderr
        assert "unknown mount option 'bogus'" in proc.stderr
        assert mount_of(mnt) is None
    finally:
        m = mounted_by(repo, mnt)
        m.cleanup()


# -- systemd units ----------------------------------------------------------------------

UNITS = ["backupfs@.service", "backupfs-snapshot@.service", "backupfs-snapshot@.timer"]


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order, repeated keys kept."""
    out = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def systemd_escape_path(path: str) -> str:
    """`systemd-escape --path`."""
    out = []
    for i, ch in enumerate(path.strip("/")):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_") or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def systemd_unescape_path(instance: str) -> str:
    """What %f is for a path-escaped instance."""
    raw = re.sub(r"\\x([0-9a-f]{2})", lambda mt: chr(int(mt.group(1), 16)), instance.replace("-", "/"))
    return "/" + raw


def test_unit_files_structure() -> None:
    svc = unit_entries(SCRIPTS / "backupfs@.service")
    (start,) = values(svc, "Service", "ExecStart")
    assert start.startswith(f"{UNIT_BINARY} mount -f ") and start.endswith(' -- "%f" "${BACKUPFS_MOUNTPOINT}"')
    assert values(svc, "Service", "Type") == ["simple"]
    assert values(svc, "Service", "KillMode") == ["mixed"]
    assert values(svc, "Service", "KillSignal") == ["SIGTERM"]
    (timeout,) = values(svc, "Service", "TimeoutStopSec")
    assert timeout.endswith("min") and int(timeout[:-3]) >= 10
    assert values(svc, "Service", "Restart") == ["on-failure"]
    assert any("BACKUPFS_MOUNTPOINT=" in v for v in values(svc, "Service", "Environment"))
    assert values(svc, "Service", "EnvironmentFile") == ["-/etc/backupfs/%i.conf"]
    assert any(v.startswith("-") and 'fusermount3 -uz -- "${BACKUPFS_MOUNTPOINT}"' in v
               for v in values(svc, "Service", "ExecStopPost"))
    assert "local-fs.target" in " ".join(values(svc, "Unit", "After"))
    assert values(svc, "Install", "WantedBy") == ["multi-user.target"]

    snap = unit_entries(SCRIPTS / "backupfs-snapshot@.service")
    assert values(snap, "Service", "Type") == ["oneshot"]
    (start,) = values(snap, "Service", "ExecStart")
    assert start.startswith(f"{UNIT_BINARY} backup --auto-full $BACKUPFS_BACKUP_ARGS -- ")
    assert start.endswith(' -- "${BACKUPFS_REPO}" "%i" incremental')
    assert "/etc/backupfs/backupfs.conf" in values(snap, "Service", "EnvironmentFile")
    assert values(snap, "Service", "IOSchedulingClass") == ["idle"]
    # Caught up at boot while the repository is still being mounted: tried again, not lost.
    assert values(snap, "Service", "Restart") == ["on-failure"] and values(snap, "Service", "RestartSec")
    assert values(snap, "Unit", "StartLimitBurst")

    timer = unit_entries(SCRIPTS / "backupfs-snapshot@.timer")
    assert values(timer, "Timer", "OnCalendar") == ["*-*-* 02:00:00"]
    assert values(timer, "Timer", "Persistent") == ["true"]
    assert values(timer, "Timer", "RandomizedDelaySec")
    assert values(timer, "Install", "WantedBy") == ["timers.target"]

    conf = dict(line.split("=", 1) for line in (SCRIPTS / "backupfs.conf.example").read_text().splitlines()
                if line and not line.startswith("#"))
    assert conf["BACKUPFS_REPO"].startswith("/")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on instances of the units (ExecStart pointed at
    the real binary: verify insists that it exists). Where systemd-analyze is
    missing, test_unit_files_structure is the check."""
    analyze = shutil.which("systemd-analyze")
    binary = backupfs_binary(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    names = {"backupfs@.service": "backupfs@srv-backups.service",
             "backupfs-snapshot@.service": "backupfs-snapshot@vm1.service",
             "backupfs-snapshot@.timer": "backupfs-snapshot@vm1.timer"}
    for template, instance in names.items():
        text = (SCRIPTS / template).read_text()
        assert UNIT_BINARY in text or template.endswith(".timer")
        (units / instance).write_text(text.replace(UNIT_BINARY, binary))
    if analyze is None:
        for instance in names.values():
            unit_entries(units / instance)  # at least: they parse
        return
    proc = subprocess.run([analyze, "verify", "--man=no", *(f"./{n}" for n in names.values())],
                          capture_output=True, text=True, cwd=units, timeout=120)
    ours = [line for line in (proc.stderr + proc.stdout).splitlines()
            if any(n in line for n in names.values()) or str(units) in line]
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert not ours, "\n".join(ours)
    # The unit file itself is a template: systemd-analyze accepts its calendar spec.
    proc = subprocess.run([analyze, "calendar", "*-*-* 02:00:00"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _expand(command: str, specifiers: dict[str, str], env: dict[str, str]) -> tuple[bool, list[str]]:
    """An Exec line as systemd runs it: (failure ignored?, argv).

    Specifiers first, then quotes; "${VAR}" is one word, "$VAR" splits at whitespace.
    """
    ignore = command.startswith("-")
    command = command.lstrip("-@:+!")
    command = re.sub(r"%(.)", lambda mt: specifiers[mt.group(1)], command)
    argv: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env.get(word[2:-1], ""))
        elif re.fullmatch(r"\$(\w+)", word):
            argv.extend(env.get(word[1:], "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda mt: env.get(mt.group(1), ""), word))
    return ignore, argv


def _unit_env(entries: list[tuple[str, str, str]], specifiers: dict[str, str],
              env_files: dict[str, str]) -> dict[str, str]:
    """Environment= lines, then EnvironmentFile= contents (files win, as in systemd)."""
    env: dict[str, str] = {}
    for value in values(entries, "Service", "Environment"):
        value = re.sub(r"%(.)", lambda mt: specifiers[mt.group(1)], value)
        value = re.sub(r"\\x([0-9a-f]{2})", lambda mt: chr(int(mt.group(1), 16)), value)  # C escapes
        for word in shlex.split(value):
            k, _, v = word.partition("=")
            env[k] = v
    for value in values(entries, "Service", "EnvironmentFile"):
        optional = value.startswith("-")
        name = re.sub(r"%(.)", lambda mt: specifiers[mt.group(1)], value.lstrip("-"))
        if name not in env_files:
            assert optional, f"EnvironmentFile {name} is required"
            continue
        for line in env_files[name].splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip()
    return env


@pytest.mark.mount
def test_units_run_for_real(tmp_path: Path) -> None:
    """backupfs@.service's Exec lines started and stopped as systemd does (SIGTERM
    to the main process), with a backup through backupfs-snapshot@.service's
    ExecStart in between: the stop unmounts, exits 0 and leaves the bitmaps saved."""
    repo = make_repo(tmp_path)
    binary = backupfs_binary(tmp_path)
    instance = systemd_escape_path(str(repo))
    if shutil.which("systemd-escape"):
        assert sh(f"systemd-escape --path {shlex.quote(str(repo))}").stdout.strip() == instance
    assert systemd_unescape_path(instance) == str(repo)
    mnt = tmp_path / "mnt" / "sub"  # ExecStartPre must create it
    specifiers = {"i": instance, "f": systemd_unescape_path(instance), "%": "%"}
    svc = unit_entries(SCRIPTS / "backupfs@.service")
    env = _unit_env(svc, specifiers, {f"/etc/backupfs/{instance}.conf": f"BACKUPFS_MOUNTPOINT={mnt}\n"})
    assert env["BACKUPFS_MOUNTPOINT"] == str(mnt)
    # Without the override the mount point is derived from the instance.
    # (Environment= undoes C escapes: /srv/vm-backups is mounted at /mnt/backupfs/srv-vm-backups.)
    derived = instance.replace("\\x2d", "-")
    assert _unit_env(svc, specifiers, {})["BACKUPFS_MOUNTPOINT"] == f"/mnt/backupfs/{derived}"

    def run_exec(key: str) -> None:
        for line in values(svc, "Service", key):
            ignore, argv = _expand(line, specifiers, env)
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert ignore or proc.returncode == 0, f"{key} {argv}: {proc.stderr}"

    run_exec("ExecStartPre")
    assert mnt.is_dir()
    (start,) = values(svc, "Service", "ExecStart")
    _, argv = _expand(start.replace(UNIT_BINARY, binary), specifiers, env)
    assert argv[:3] == [binary, "mount", "-f"] and str(repo) in argv and str(mnt) in argv

    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **env})
    log: list[str] = []
    try:
        assert daemon.stderr is not None
        for line in daemon.stderr:  # ends at EOF if the daemon dies
            log.append(line)
            if "serving" in line:
                break
        assert mount_of(mnt) is not None, "".join(log)

        # The nightly unit, for real: an incremental (a full, as there is none yet).
        snap = unit_entries(SCRIPTS / "backupfs-snapshot@.service")
        snap_spec = {"i": "d1", "%": "%"}
        snap_env = _unit_env(snap, snap_spec, {"/etc/backupfs/backupfs.conf": f"BACKUPFS_REPO={repo}\n"})
        (start,) = values(snap, "Service", "ExecStart")
        _, snap_argv = _expand(start.replace(UNIT_BINARY, binary), snap_spec, snap_env)
        proc = subprocess.run(snap_argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        backups = [b for b in os.listdir(mnt / "d1" / "backups") if b != "latest"]
        assert len(backups) == 1 and backups[0].endswith("-full"), backups

        # Dirty the device, then stop the service.
        with open(mnt / "d1" / "device", "r+b") as f:
            f.seek(1 * MiB)
            f.write(b"\xa5" * 128 * 1024)
        daemon.send_signal(signal.SIGTERM)
        rest = daemon.stderr.read()
        rc = daemon.wait(timeout=120)
        log.append(rest)
        assert rc == 0, "".join(log)
        assert "bitmaps saved" in rest, rest
        assert mount_of(mnt) is None
        run_exec("ExecStopPost")  # harmless after a clean stop
        status = cli("status", repo).stdout.decode()
        assert "not mounted" in status
        assert "bitmap: trusted; dirty since last backup 128 KiB" in status, status
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if mount_of(mnt) is not None:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if daemon.stderr is not None:
            daemon.stderr.close()


# -- backupfs-restore-file --------------------------------------------------------------


def _mbr(parts: list[tuple[int, int]]) -> bytes:
    """A DOS partition table: (first sector, sectors) of each Linux partition."""
    mbr = bytearray(512)
    mbr[440:444] = b"\x42\x46\x53\x31"
    for i, (start, count) in enumerate(parts):
        mbr[446 + 16 * i: 462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                                                       start, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _make_fs(path: Path, size: int, kind: str, label: str, content: Path | None) -> None:
    args = [f"mkfs.{kind}", "-q", "-F", "-L", label]
    if content is not None:
        args += ["-d", str(content)]
    sh(" ".join(shlex.quote(a) for a in [*args, str(path), f"{size // 1024}k"]))


def _disk(tmp: Path, name: str, layout: str) -> Path:
    """A 64 MiB disk. layout: "two" = p1 ext2 (boot) + p2 ext4 (root, etc/hostname);
    "one" = p1 without a filesystem + p2 ext4; "whole" = ext4 on the whole disk."""
    content = tmp / "content"
    if not content.exists():
        (content / "etc").mkdir(parents=True)
        (content / "etc" / "hostname").write_text(HOSTNAME)
        (content / "home").mkdir()
        (content / "home" / "notes.txt").write_text("the old notes\n")
    disk = tmp / f"{name}.img"
    size = 64 * MiB
    if layout == "whole":
        _make_fs(disk, size, "ext4", "whole", content)
        return disk
    p1 = (2048, 8 * MiB // 512)
    p2 = (p1[0] + p1[1], size // 512 - p1[0] - p1[1])
    with open(disk, "wb") as f:
        f.truncate(size)
        f.write(_mbr([p1, p2]))
    if layout == "two":
        fs1 = tmp / f"{name}-p1.fs"
        _make_fs(fs1, p1[1] * 512, "ext2", "boot", None)
        sh(f"dd if={fs1} of={disk} bs=512 seek={p1[0]} conv=notrunc status=none")
        fs1.unlink()
    fs2 = tmp / f"{name}-p2.fs"
    _make_fs(fs2, p2[1] * 512, "ext4", "root", content)
    sh(f"dd if={fs2} of={disk} bs=1M seek={p2[0] * 512 // MiB} conv=notrunc status=none")
    fs2.unlink()
    return disk


@pytest.fixture(scope="module")
def backups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mounted, dict[str, Path]]]:
    """A mounted repository with one device `disk` and three backups of it, each
    a different disk: `two` (a full backup: two filesystems), `one` (an
    incremental: one filesystem, in partition 2) and `whole` (an incremental:
    ext4 on the whole disk, no partition table; it is `latest`). The layouts
    after the first are written through the mounted device file."""
    tmp = tmp_path_factory.mktemp("restore")
    repo = tmp / "repo"
    cli("init", repo)
    cli("device", "add", repo, "disk", _disk(tmp, "two", "two"))
    (tmp / "mnt").mkdir()
    m = Mounted(repo, tmp / "mnt")
    m.start()
    try:
        sh(f"echo full > {m.path('disk', 'snapshot')}")
        for layout in ("one", "whole"):
            image = _disk(tmp, layout, layout)
            sh(f"dd if={image} of={m.path('disk', 'device')} bs=1M conv=notrunc,fsync status=none")
            image.unlink()
            sh(f"echo incremental > {m.path('disk', 'snapshot')}")
        ids = sorted(b for b in os.listdir(m.path("disk", "backups")) if b != "latest")
        assert [i.rsplit("-", 1)[1] for i in ids] == ["full", "incremental", "incremental"], ids
        assert os.readlink(m.path("disk", "backups", "latest")) == ids[2]
        yield m, {layout: m.path("disk", "backups", i) for layout, i in zip(("two", "one", "whole"), ids)}
    finally:
        m.cleanup()
    assert "Traceback" not in m.log(), m.log()


def restore(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RESTORE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_clean(m: Mounted, restore_dir: Path, image: Path) -> None:
    """No mount at restore_dir, no loop device on any file of the backups mount
    (`losetup -j` on the backup file agrees)."""
    assert mount_of(restore_dir) is None, f"{restore_dir} is still mounted"
    assert loops_under(m.mnt) == []
    proc = subprocess.run(["losetup", "-j", os.path.realpath(image)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def _undo(m: Mounted, restore_dir: Path) -> None:
    """Only if a test failed half-way: take down what the helper left."""
    if mount_of(restore_dir) is not None:
        subprocess.run(["umount", "-l", str(restore_dir)], capture_output=True)
    for entry in loops_under(m.mnt):
        subprocess.run(["losetup", "-d", entry.split(":")[0]], capture_output=True)


Backups = tuple[Mounted, dict[str, Path]]


@pytest.mark.mount
def test_restore_runs_a_command_in_the_partition(backups: Backups, tmp_path: Path) -> None:
    m, images = backups
    two = images["two"]
    target = tmp_path / "restore"  # does not exist: the helper makes it and removes it again
    try:
        proc = restore("-p", "2", two, target, "--", "cat", "etc/hostname")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == HOSTNAME
        assert "untrusted" in proc.stderr and "fuse2fs -o ro" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not target.exists()
        assert_clean(m, target, two)

        # An existing directory stays; the command's status is the helper's; the
        # filesystem is mounted read-only, nodev, nosuid, noexec.
        target.mkdir()
        proc = restore("-p2", two, target, "--", "sh", "-c",
                       "grep -q 'the old notes' home/notes.txt && ! touch home/x 2>/dev/null"
                       " && awk -v d=\"$PWD\" '$2 == d {print $4}' /proc/mounts && exit 7")
        assert proc.returncode == 7, proc.stderr
        opts = proc.stdout.strip().split(",")
        assert opts[0] == "ro" and {"nodev", "nosuid", "noexec"} <= set(opts), proc.stdout
        assert target.is_dir()
        assert_clean(m, target, two)

        # The newest backup through `latest` (a whole-disk filesystem): copy a file out.
        out = tmp_path / "notes.txt"
        latest = m.path("disk", "backups", "latest")
        proc = restore(latest, target, "--", "cp", "home/notes.txt", out)
        assert proc.returncode == 0, proc.stderr
        assert out.read_text() == "the old notes\n"
        assert_clean(m, target, latest)
    finally:
        _undo(m, target)


@pytest.mark.mount
def test_restore_lists_partitions(backups: Backups, tmp_path: Path) -> None:
    m, images = backups
    try:
        proc = restore("--list", images["two"])
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert "dos partition table, 2 partitions" in proc.stdout, proc.stdout
        assert ["1", "8.0MiB", "ext2", "boot"] in rows, proc.stdout
        assert ["2", "55.0MiB", "ext4", "root"] in rows, proc.stdout
        assert_clean(m, tmp_path, images["two"])

        proc = restore("--list", images["one"])
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert ["1", "8.0MiB", "-"] in rows and ["2", "55.0MiB", "ext4", "root"] in rows, proc.stdout

        proc = restore("--list", images["whole"])
        assert proc.returncode == 0, proc.stderr
        assert "no partition table" in proc.stdout
        assert ["-", "64.0MiB", "ext4", "whole"] in [line.split() for line in proc.stdout.splitlines()]
        assert_clean(m, tmp_path, images["whole"])
    finally:
        _undo(m, tmp_path)


@pytest.mark.mount
def test_restore_chooses_or_asks(backups: Backups, tmp_path: Path) -> None:
    m, images = backups
    two, one, whole = images["two"], images["one"], images["whole"]
    target = tmp_path / "restore"
    target.mkdir()
    try:
        # Two filesystems and no -p: the list and a clear question, nothing mounted.
        proc = restore(two, target, "--", "true")
        assert proc.returncode == 1, proc.stderr
        assert "has 2 filesystems (partitions 1, 2): choose one with -p N" in proc.stderr
        assert re.search(r"^1 .*ext2", proc.stderr, re.M) and re.search(r"^2 .*ext4", proc.stderr, re.M)
        assert proc.stdout == ""
        assert_clean(m, target, two)

        # Partition 1 is the other filesystem.
        proc = restore("-p", "1", two, target, "--", "ls")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["lost+found"]
        assert_clean(m, target, two)

        # One filesystem among two partitions: taken without -p.
        proc = restore(one, target, "--", "cat", "etc/hostname")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == HOSTNAME
        assert "partition 2 (ext4)" in proc.stderr
        assert_clean(m, target, one)
        proc = restore("-p", "1", one, target, "--", "true")
        assert proc.returncode == 1
        assert "no filesystem found on partition 1" in proc.stderr
        assert_clean(m, target, one)

        # A disk without a partition table: the whole disk, no -p needed (and -p refused).
        proc = restore(whole, target, "--", "cat", "etc/hostname")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == HOSTNAME
        assert "the whole disk (ext4)" in proc.stderr
        assert_clean(m, target, whole)
        proc = restore("-p", "1", whole, target, "--", "true")
        assert proc.returncode == 1
        assert "has no partition table" in proc.stderr
        assert_clean(m, target, whole)

        # No such partition.
        proc = restore("-p", "3", two, target, "--", "true")
        assert proc.returncode == 1
        assert "has no partition 3" in proc.stderr
        assert_clean(m, target, two)
    finally:
        _undo(m, target)


@pytest.mark.mount
def test_restore_bad_usage(backups: Backups, tmp_path: Path) -> None:
    m, images = backups
    two = images["two"]
    target = tmp_path / "restore"
    target.mkdir()
    try:
        for args in ([], [two], [two, target, "extra"], ["-x", two, target], ["--list"],
                     ["--list", two, target], [two, target, "--"], ["-p"]):
            proc = restore(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "usage: backupfs-restore-file [-p PARTITION] IMAGE MOUNTDIR" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        proc = restore("-p", "two", two, target)
        assert proc.returncode == 2 and "bad partition number" in proc.stderr
        proc = restore(tmp_path / "missing.img", target)
        assert proc.returncode == 1 and "no such file" in proc.stderr
        proc = restore(two, two)
        assert proc.returncode == 1 and "is not a directory" in proc.stderr
        proc = restore(two, m.mnt)
        assert proc.returncode == 1 and "is already a mount point" in proc.stderr
        assert_clean(m, target, two)
    finally:
        _undo(m, target)


@pytest.mark.mount
def test_the_file_restore_helper_refuses_a_symlinked_mount_dir(
    tmp_path: Path, open_tmp: Path, other_user: OtherUser
) -> None:
    """Whoever made the link would choose where root mounts the backup, and which directory it hides."""
    user_dir = open_tmp / "user"
    user_dir.mkdir()
    os.chown(user_dir, other_user.uid, other_user.gid)
    image = tmp_path / "fs.img"
    sh(f"mkfs.ext4 -q -F {image} 8M")
    hidden = tmp_path / "root-only"
    hidden.mkdir(mode=0o700)
    (hidden / "keep").write_text("hidden by a mount on top\n")
    link = user_dir / "mnt"
    assert other_user.run("ln", "-s", hidden, link).returncode == 0
    for mountdir in (link, f"{link}/"):
        proc = subprocess.run([str(RESTORE), str(image), str(mountdir), "--", "true"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1 and f"{link} is a symlink" in proc.stderr, proc.stderr
    assert not os.path.ismount(hidden) and (hidden / "keep").read_text() == "hidden by a mount on top\n"
    assert link.is_symlink()


@pytest.mark.mount
def test_the_file_restore_helper_refuses_a_mount_dir_another_user_can_swap(
    tmp_path: Path, open_tmp: Path, other_user: OtherUser
) -> None:
    """A real directory now is no proof: mount(8) follows the path again, so a
    user who can rename an entry on the way swaps in a symlink between the
    check and the mount (a loop of renameat2(RENAME_EXCHANGE) did, 2 runs in
    60), and root mounts the backup over the link's target. Refused unless
    only root can change every directory on the way."""
    user_dir = open_tmp / "user"
    user_dir.mkdir()
    os.chown(user_dir, other_user.uid, other_user.gid)
    theirs = user_dir / "mnt"  # a directory of theirs in a directory of theirs
    assert other_user.run("mkdir", theirs).returncode == 0
    mine_in_theirs = user_dir / "rootmnt"  # root's, but they can rename it
    mine_in_theirs.mkdir()
    writable = open_tmp / "writable"  # root's, writable by all, not sticky
    writable.mkdir()
    writable.chmod(0o777)
    owned = open_tmp / "owned"  # theirs, in root's directory: they can still replace it (or /tmp's, sticky)
    owned.mkdir()
    os.chown(owned, other_user.uid, other_user.gid)
    link_dir = open_tmp / "link"  # root's own symlink on the way
    link_dir.symlink_to(tmp_path)
    image = tmp_path / "fs.img"
    sh(f"mkfs.ext4 -q -F {image} 8M")
    cases = {
        theirs: f"{user_dir} belongs to user {other_user.name}",
        user_dir / "new": f"{user_dir} belongs to user {other_user.name}",
        mine_in_theirs: f"{user_dir} belongs to user {other_user.name}",
        owned: f"{owned} belongs to user {other_user.name}",
        writable / "new": f"{writable} is writable by other users",
        link_dir / "new": f"{link_dir} is a symlink",
    }
    for mountdir, why in cases.items():
        proc = subprocess.run([str(RESTORE), str(image), str(mountdir), "--", "true"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1 and f"{mountdir} is out of root's sole control ({why})" in proc.stderr, \
            proc.stderr
        assert "mounted" not in proc.stderr
        assert not os.path.ismount(mountdir)
        assert subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout == ""
    assert not (user_dir / "new").exists() and not (writable / "new").exists()

    # A new directory in a sticky directory of root's (/tmp itself) is fine.
    fresh = Path(tempfile.mktemp(prefix="bfs-restore-", dir="/tmp"))
    proc = subprocess.run([str(RESTORE), str(image), str(fresh), "--", "pwd"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{fresh}\n" and not fresh.exists()


@pytest.mark.mount
@pytest.mark.parametrize("how", ["ctrl-c", "enter", "sigterm"])
def test_restore_waits_then_cleans_up(backups: Backups, tmp_path: Path, how: str) -> None:
    """Without a command: mounted until Enter, Ctrl-C (SIGINT) or SIGTERM."""
    m, images = backups
    two = images["two"]
    target = tmp_path / "restore"
    target.mkdir()
    proc = subprocess.Popen([str(RESTORE), "-p", "2", str(two), str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        first = proc.stdout.readline()  # printed once the filesystem is mounted
        assert first.startswith("mounted partition 2 (ext4) of "), first + proc.stderr.read()
        assert first.rstrip().endswith(f"read-only at {target}")
        assert "press Enter" in proc.stdout.readline()
        found = mount_of(target)
        assert found is not None and found[2].split(",")[0] == "ro", found
        assert (target / "etc" / "hostname").read_text() == HOSTNAME
        assert loops_under(m.mnt) != []
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            expected = 130
        elif how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            expected = 143
        else:
            proc.stdin.write("\n")
            proc.stdin.flush()
            expected = 0
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert rc == expected, err
        assert "Traceback" not in err
        assert target.is_dir()
        assert_clean(m, target, two)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        _undo(m, target)


def test_scripts_pass_shell_checks() -> None:
    """bash -n / sh -n always; shellcheck and dash too where installed."""
    for script, shell in ((MOUNT_HELPER, "sh"), (RESTORE, "bash")):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        first = script.read_text().splitlines()[0]
        assert first == f"#!/bin/{shell}", first
        sh(f"{shell} -n {script}")
        if shell == "sh" and shutil.which("dash"):
            sh(f"dash -n {script}")
        if shutil.which("shellcheck"):
            sh(f"shellcheck -s {shell} {script}")
