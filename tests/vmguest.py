"""A real VM on a disk file: the guest kernel, its initramfs, QEMU, its console.

For tests/test_vm.py and bench/vm_guest.py. The guest is Debian's kernel
(scripts/guest-kernel unpacks it into a cache, without installing it), a
busybox initramfs built here, and tests/vm_workload.c compiled here: it
writes numbered records to /dev/vda and reports on the serial console each
batch it has fsynced. The host reads that console and, when asked, answers
each backup's trigger with a mark line, so every backup can be checked
against what the guest had made durable before it, and what it started only
after (tests/vmrecords.py checks every backup against that).

Only standard tools and the kernel's own interfaces: the modules' load order
comes from their ``depends=`` in .modinfo (the cache has no modules.dep), the
cpio archive is written here (no cpio on the machine).
"""

from __future__ import annotations

import gzip
import lzma
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.vmrecords import Schedule

KERNEL_CACHE = Path(os.environ.get("BACKUPFS_GUEST_KERNEL", "/var/cache/backupfs-tests/kernel"))
WORKLOAD_SOURCE = Path(__file__).with_name("vm_workload.c")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# The modules the guest needs for /dev/vda; their dependencies are found.
GUEST_MODULES = ("virtio_pci", "virtio_blk")
AIO_MODES = ("io_uring", "native", "threads")


class GuestUnavailable(Exception):
    """Something the VM needs is not on this machine (the message says what)."""


# -- the kernel and its modules -----------------------------------------------------------


@dataclass
class GuestKernel:
    vmlinuz: Path
    release: str
    modules: list[Path]  # in load order


def module_depends(ko: Path) -> list[str]:
    """A module's ``depends=`` from its .modinfo strings (a .ko or .ko.xz)."""
    data = _module_bytes(ko)
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends=") : data.index(b"\0", at + 1)].decode()
    return [d for d in value.split(",") if d]


def _module_bytes(ko: Path) -> bytes:
    data = ko.read_bytes()
    return lzma.decompress(data) if ko.name.endswith(".xz") else data


def _module_name(ko: Path) -> str:
    return ko.name.split(".ko")[0].replace("-", "_")


def find_kernel(cache: Path = KERNEL_CACHE) -> GuestKernel:
    """The cached guest kernel with the modules for virtio disks, dependencies
    first (none for a driver its config builds in; Debian's has them as modules)."""
    vmlinuz = cache / "vmlinuz"
    if not vmlinuz.is_file():
        raise GuestUnavailable(f"no guest kernel in {cache} (scripts/guest-kernel unpacks one, as root)")
    available = {_module_name(p): p for p in (cache / "modules").glob("*.ko*")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in available:
            raise GuestUnavailable(f"guest kernel module {name} is not in {cache / 'modules'}")
        for dep in module_depends(available[name]):
            visit(dep)
        order.append(available[name])

    builtin = built_in(cache / "config")
    for name in GUEST_MODULES:
        if name not in builtin:
            visit(name)
    return GuestKernel(vmlinuz, (cache / "release").read_text().strip(), order)


def built_in(config: Path) -> set[str]:
    """Which of GUEST_MODULES the kernel's config builds in (=y): those need no insmod."""
    try:
        text = config.read_text()
    except OSError:
        return set()
    return {name for name in GUEST_MODULES if re.search(rf"^CONFIG_{name.upper()}=y$", text, re.M)}


# -- the initramfs ------------------------------------------------------------------------------


def compile_workload(out_dir: Path) -> Path:
    """tests/vm_workload.c as a static binary (the guest has no libc)."""
    out = out_dir / "workload"
    proc = subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", str(out), str(WORKLOAD_SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestUnavailable(f"cannot compile {WORKLOAD_SOURCE.name}: {proc.stderr.strip()}")
    return out


INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
for m in {modules}; do
    $B insmod /modules/$m.ko || echo "BFS error insmod $m"
done
i=0
while [ ! -b "${{bfs_dev:-/dev/vda}}" ] && [ $i -lt 200 ]; do $B usleep 50000; i=$((i+1)); done
/workload
echo "BFS exit $?"
$B sync
$B poweroff -f
"""


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One cpio "newc" entry (header, name, data, each padded to 4 bytes)."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initramfs(out_dir: Path, kernel: GuestKernel, workload: Path) -> Path:
    """busybox, the workload, the modules and an /init that runs the workload then powers off."""
    if not BUSYBOX.is_file():
        raise GuestUnavailable(f"no {BUSYBOX} (Debian package busybox-static)")
    names = [_module_name(m) for m in kernel.modules]
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("proc", 0o040755, b"", (0, 0)),
        ("sys", 0o040755, b"", (0, 0)),
        ("bin", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)),
        ("modules", 0o040755, b"", (0, 0)),
        ("init", 0o100755, INIT.format(modules=" ".join(names)).encode(), (0, 0)),
        ("workload", 0o100755, workload.read_bytes(), (0, 0)),
    ]
    entries += [(f"modules/{n}.ko", 0o100644, _module_bytes(m), (0, 0)) for n, m in zip(names, kernel.modules)]
    archive = b"".join(_cpio_entry(n, mode, d, rdev, i + 1) for i, (n, mode, d, rdev) in enumerate(entries))
    archive += _cpio_entry("TRAILER!!!", 0)
    out = out_dir / "initramfs.cpio.gz"
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


@dataclass
class GuestFiles:
    kernel: GuestKernel
    initramfs: Path


def prepare_guest(out_dir: Path) -> GuestFiles:
    """Everything a boot needs, built into ``out_dir``; GuestUnavailable names what is missing."""
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"no {QEMU} (Debian package qemu-system-x86)")
    kernel = find_kernel()
    return GuestFiles(kernel, build_initramfs(out_dir, kernel, compile_workload(out_dir)))


# -- QEMU and its console -------------------------------------------------------------------------


def kvm_unusable_reason() -> str | None:
    """Why this machine's KVM cannot run the guest (None: it can).

    /dev/kvm opening is not enough: a host whose CPU shows neither vmx nor
    svm (a VM itself; kvm_pvm here, which runs only guests built for PVM)
    boots the firmware and then hangs in the kernel's first instructions.
    """
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return f"/dev/kvm does not open ({e.strerror})"
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "vmx" not in flags and "svm" not in flags:
        pvm = " (kvm_pvm is loaded: it runs only PVM guests)" if Path("/sys/module/kvm_pvm").exists() else ""
        return f"/dev/kvm opens but the CPU shows neither vmx nor svm{pvm}"
    return None


@dataclass
class Event:
    kind: str  # "synced", "mark", "verify", "done", "error", "exit", "eof"
    args: list[str]
    at: float  # time.monotonic() when the host read it


LINE = re.compile(r"BFS (synced|mark|verify|done|error|exit|start)\b(.*)")


@dataclass
class VM:
    """One qemu-system-x86_64 running the workload; its console read by a thread."""

    proc: subprocess.Popen
    aio: str
    accel: str
    console: list[str] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    stderr_path: Path | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n")
            self.console.append(text)
            m = LINE.search(text)
            if m:
                self.events.put(Event(m.group(1), m.group(2).split(), time.monotonic()))
        self.events.put(Event("eof", [], time.monotonic()))

    def next_event(self, timeout: float) -> Event:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the guest said nothing for {timeout:.0f} s; console:\n{self.tail()}") from None

    def pending(self) -> Iterator[Event]:
        """Events already read, without waiting."""
        while True:
            try:
                yield self.events.get_nowait()
            except queue.Empty:
                return

    def send(self, line: str) -> None:
        """A line to the guest's console; nothing if QEMU has gone (the
        guest may finish and power off while a backup runs)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def tail(self, n: int = 40) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path and self.stderr_path.exists() else ""
        return "\n".join(self.console[-n:]) + (f"\nqemu stderr:\n{err}" if err.strip() else "")

    def kill(self) -> None:
        """Whatever state it is in: no qemu of ours left."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def start_vm(files: GuestFiles, disk: Path, schedule: Schedule, work: Path,
             memory_mb: int = 256, aio_modes: tuple[str, ...] = AIO_MODES, cache: str = "none",
             log: Callable[[str], None] = print) -> VM:
    """Boot the guest on ``disk`` (raw, virtio, cache=none), io_uring first.

    ``cache``: QEMU's cache mode for the disk (the test uses ``none``,
    O_DIRECT on the file, as a VM host would; the bench also ``writeback``
    for a baseline that goes through the host's page cache as our device
    does). A mode QEMU refuses (it exits before the guest says anything, naming
    the aio mode or io_uring) is logged with QEMU's reason and the next one
    is tried: io_uring can be missing from QEMU's build or disabled on the
    host (kernel.io_uring_disabled).
    """
    why_not_kvm = kvm_unusable_reason()
    accel = "tcg" if why_not_kvm else "kvm"
    if why_not_kvm:
        log(f"vm: {why_not_kvm}: TCG, QEMU's emulator (slower)")
    reasons = []
    for aio in aio_modes:
        stderr_path = work / f"qemu-{aio}.stderr"
        cmd = [QEMU, "-accel", accel, "-m", str(memory_mb), "-smp", "1", "-nographic", "-no-reboot",
               "-monitor", "none", "-serial", "stdio", "-nic", "none",
               "-kernel", str(files.kernel.vmlinuz), "-initrd", str(files.initramfs),
               "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {schedule.cmdline()}",
               "-drive", f"file={disk},format=raw,if=virtio,cache={cache},aio={aio}"]
        if accel == "kvm":
            cmd[1:1] = ["-cpu", "max"]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        vm = VM(proc, aio, accel, stderr_path=stderr_path)
        threading.Thread(target=vm._read, daemon=True).start()
        try:
            first = vm.next_event(timeout=300)
        except BaseException:
            vm.kill()
            raise
        if first.kind == "start":
            if reasons:
                log("vm: " + "; ".join(reasons) + f"; using aio={aio}")
            return vm
        vm.kill()
        err_text = stderr_path.read_text(errors="replace").strip()
        if first.kind == "eof" and re.search(r"aio|io_uring|io-uring", err_text, re.I):
            reasons.append(f"aio={aio} refused: {err_text.splitlines()[-1] if err_text else 'no reason given'}")
            continue
        raise AssertionError(f"the guest did not start its workload (aio={aio}): {first.kind} "
                             f"{' '.join(first.args)}\n{vm.tail()}")
    raise AssertionError("QEMU refused every aio mode: " + "; ".join(reasons))


# -- one run: the guest writes, the host takes backups ----------------------------------------------


@dataclass
class BackupTaken:
    synced: int  # the last batch the guest had reported synced before the trigger (-1: none)
    seconds: float = 0.0  # the trigger's write(), start to return
    next_batch: int | None = None  # from the guest's mark; None: the guest had finished
    marked_while_copying: bool = False  # the trigger sent the mark while the job was copying
    returned_at: float = 0.0  # time.monotonic() when the trigger returned


@dataclass
class RunResult:
    aio: str
    accel: str
    records: int
    bytes: int
    guest_seconds: float
    verify: str
    backups: list[BackupTaken]
    console: list[str]
    last_synced: int
    synced_at: list[float]  # host clock when each "synced" line was read, in batch order

    def batches_during(self, backup: BackupTaken) -> int:
        """Batches the guest started after ``backup``'s point in time and
        had synced before the trigger returned: written while the job ran
        (through copy-before-write where they met regions not copied yet)."""
        assert backup.next_batch is not None
        return sum(1 for at in self.synced_at[backup.next_batch :] if at < backup.returned_at)

    def rate_between(self, first: int, last: int, batch: int) -> float:
        """Records per second from batch ``first``'s sync to batch ``last``'s, by the host's clock."""
        return (last - first) * batch / (self.synced_at[last] - self.synced_at[first])

    @property
    def records_per_s(self) -> float:
        return self.records / self.guest_seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.guest_seconds / 1e6


def run_guest(files: GuestFiles, disk: Path, schedule: Schedule, work: Path,
              trigger: Callable[[Callable[[], None]], None] | None = None, every_batches: int | None = None,
              every_seconds: float | None = None, timeout: float = 240, cache: str = "none",
              stop_after: int | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Boot, let the workload run, and call ``trigger`` (a backup) whenever
    ``every_batches`` more batches are synced, or ``every_seconds`` have
    passed at a synced batch, since the last one returned. ``trigger``
    gets ``mark``: called once the backup's point in time has passed (the
    job seen copying), it sends the guest "T k", and the guest's answer
    says which batches started after it: none of their records may be in
    the backup. A trigger that does not call it has it called when it
    returns. With ``stop_after``, once that many backups have returned
    the guest is told to stop after its current batch (a guest under KVM
    could otherwise finish before the host took a few). Driven by the
    console, never by sleeping. Returns when QEMU has exited (the guest
    powered off)."""
    vm = start_vm(files, disk, schedule, work, cache=cache, log=log)
    backups: list[BackupTaken] = []
    state: dict[str, object] = {"synced": -1, "done": None, "verify": "", "eof": False}
    synced_at: list[float] = []

    def handle(ev: Event) -> None:
        if ev.kind == "error":
            raise AssertionError(f"the guest reported an error: {' '.join(ev.args)}\n{vm.tail()}")
        if ev.kind == "eof":
            state["eof"] = True
        elif ev.kind == "verify":
            state["verify"] = " ".join(ev.args)
        elif ev.kind == "done":
            state["done"] = ev.args
        elif ev.kind == "mark":
            backups[int(ev.args[0])].next_batch = int(ev.args[2])
        elif ev.kind == "synced":
            state["synced"] = int(ev.args[0])
            synced_at.append(ev.at)

    last_trigger_batch = -1
    last_trigger_end = time.monotonic()
    stopping = False
    deadline = time.monotonic() + timeout
    try:
        while not state["eof"]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the guest did not finish within {timeout:.0f} s; console:\n{vm.tail()}")
            ev = vm.next_event(timeout=left)
            handle(ev)
            if ev.kind != "synced" or trigger is None:
                continue
            for more in vm.pending():  # batches already reported count as synced before the trigger
                handle(more)
            synced = int(state["synced"])  # type: ignore[call-overload]
            if state["done"] is not None or state["eof"] or synced >= schedule.batches - 1 or stopping:
                continue
            due = ((every_batches is not None and synced - last_trigger_batch >= every_batches)
                   or (every_seconds is not None and time.monotonic() - last_trigger_end >= every_seconds))
            if due:
                taken = BackupTaken(synced)
                backups.append(taken)
                k = len(backups) - 1

                def mark() -> None:
                    if not taken.marked_while_copying:
                        taken.marked_while_copying = True
                        vm.send(f"T {k}")

                t0 = time.monotonic()
                trigger(mark)
                last_trigger_end = time.monotonic()
                taken.seconds = last_trigger_end - t0
                taken.returned_at = last_trigger_end
                if not taken.marked_while_copying:
                    vm.send(f"T {k}")
                last_trigger_batch = synced
                if stop_after is not None and len(backups) >= stop_after:
                    vm.send("S")
                    stopping = True
        rc = vm.proc.wait(timeout=60)
        done = state["done"]
        if not isinstance(done, list):
            raise AssertionError(f"the guest powered off without its summary (qemu exit {rc}):\n{vm.tail()}")
    finally:
        vm.kill()
    for b in backups:
        if b.next_batch is None:  # the guest had written its last batch before it read the mark
            b.next_batch = int(state["synced"]) + 1  # type: ignore[call-overload]
    return RunResult(vm.aio, vm.accel, int(done[1]), int(done[3]), float(done[5]), str(state["verify"]),
                     backups, vm.console, int(state["synced"]), synced_at)  # type: ignore[call-overload]
