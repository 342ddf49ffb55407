"""What the benchmarks share: our mount and QEMU's exports as servers, and the machine's state.

`OurMount` (a `backupfs mount` daemon), `QemuExport` (a qemu-storage-daemon
FUSE export), `mount_new_repo`, and the load and pressure lines every bench
prints. bench/fuse_vs_qemu.py, bench/device_iops.py, bench/backup_vs_qemu.py
and bench/vm_guest.py use them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

MOUNT_TIMEOUT = 30.0


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, major:minor, fs type) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = fields[4].encode().decode("unicode_escape")
            out.append((point, fields[2], right.split()[0]))
    return out


def fs_type(path: str) -> str:
    """File system type of the mount that holds ``path``."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    for point, _, fstype in mountinfo():
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def mounted_at(path: str) -> str | None:
    """major:minor of the mount whose mount point is exactly ``path``."""
    path = os.path.realpath(path)
    for point, dev, _ in mountinfo():
        if point == path:
            return dev
    return None


def pressure() -> str:
    """Load average and CPU/IO pressure: other work on the machine slows both sides."""
    out = [f"load {os.getloadavg()[0]:.1f}"]
    for kind in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{kind}") as f:
                some = f.readline().split()[2]  # avg60=...
            out.append(f"{kind} pressure {some.replace('avg60=', '')}% (60 s)")
        except (OSError, IndexError):
            pass
    return ", ".join(out)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_line(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def backupfs_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "backupfs")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from backupfs.cli import main; sys.exit(main())"]


def run(argv: list[str]) -> str:
    """Run a command; its stderr in the exception when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class OurMount:
    """`backupfs mount` of a repository; `backupfs umount` (or, failing that, our own
    daemon's pid, then a lazy unmount) on stop."""

    def __init__(self, repo: str, mnt: str) -> None:
        self.repo = repo
        self.mnt = mnt
        self.pid: int | None = None

    def start(self) -> None:
        run(backupfs_command() + ["mount", self.repo, self.mnt])
        with open(os.path.join(self.repo, "mount.json")) as f:
            self.pid = int(json.load(f)["pid"])

    def stop(self) -> None:
        if self.pid is None and mounted_at(self.mnt) is None:
            return
        proc = subprocess.run(backupfs_command() + ["umount", self.mnt], capture_output=True, text=True)
        if proc.returncode != 0 or mounted_at(self.mnt) is not None:
            print(f"warning: backupfs umount failed: {proc.stderr.strip()}", file=sys.stderr)
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
                _wait_gone(self.pid, 30.0)
            if mounted_at(self.mnt) is not None:
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.pid = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)


def mount_new_repo(repo: str, mnt: str, devices: dict[str, str], granularity: str | None = None) -> OurMount:
    """A new repository holding ``devices`` (name -> source), mounted at ``mnt``
    (made if missing); the caller stops the mount."""
    os.makedirs(mnt, exist_ok=True)
    run(backupfs_command() + ["init", repo])
    for name, source in devices.items():
        run(backupfs_command() + ["device", "add", repo, name, source]
            + (["--granularity", granularity] if granularity else []))
    mount = OurMount(repo, mnt)
    mount.start()
    return mount


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


class QemuExport:
    """One qemu-storage-daemon exporting one image over FUSE onto a regular file."""

    def __init__(self, image: str, fmt: str, export_file: str, writable: bool, log_path: str) -> None:
        self.image = image
        self.fmt = fmt
        self.export_file = os.path.realpath(export_file)
        self.writable = writable
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        ro = "off" if self.writable else "on"
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={self.image},node-name=f,read-only={ro}",
            # The qcow2 driver opens the backing chain named in the header.
            "--blockdev", f"driver={self.fmt},file=f,node-name=n,read-only={ro}",
            "--export", f"type=fuse,id=e,node-name=n,mountpoint={self.export_file},"
                        f"writable={'on' if self.writable else 'off'}",
        ]

    def start(self) -> None:
        if not os.path.exists(self.export_file):
            open(self.export_file, "wb").close()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while mounted_at(self.export_file) is None:
            if self.proc.poll() is not None:
                with open(self.log_path) as f:
                    raise RuntimeError(f"qemu-storage-daemon exited ({self.proc.returncode}): {f.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not export {self.export_file} in time")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM our daemon (it unmounts its export on exit); SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if mounted_at(self.export_file) is not None:
            subprocess.run(["fusermount3", "-uz", self.export_file], capture_output=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
