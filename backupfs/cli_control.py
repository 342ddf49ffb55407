"""`device add | remove` and `import` on a mounted repository: asked of its daemon.

The daemon holds the repository's lock, so these commands write one line
to ``MOUNT/.control`` (grammar: backupfs/control.py; daemon side:
backupfs/repocontrol.py) and read the outcome back from the same open
file, as JSON. The write returns when the work is done and durable; the
new device is in the mount by then. What is printed is what the command
prints unmounted, so scripts see no difference.

An import of a long chain can take minutes: on a terminal, the layer
being imported is shown as it would be unmounted (read from the control
file's status xattr while the write waits); Ctrl-C cancels it, and the
daemon leaves nothing of it behind.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from typing import Any

from backupfs.cli_common import close_quietly, default_stop_signals
from backupfs.control import CONTROL_NAME, ControlCommand, DeviceAdd, DeviceRemove, DeviceSet, Import
from backupfs.mountinfo import MountRecord, dead_mount_error
from backupfs.mountstatus import STATUS_XATTR
from engine.ceph import is_rbd, parse as parse_rbd
from engine.errors import BackupfsError, UsageError
from engine.stopsignals import no_stops_in_new_threads
from engine.text import escape
from engine.units import format_size

PROGRESS_POLL = 0.2  # seconds between looks at an import's layer, on a terminal
OUTCOME_MAX = 1 << 20


def _control_file(record: MountRecord, what: str) -> str:
    """The mount's control file, which must answer; the error says what to do if not."""
    path = os.path.join(record.mountpoint, CONTROL_NAME)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise UsageError(
            f"the mount at {record.mountpoint} (daemon pid {record.pid}) was started by an older backupfs, "
            f"which cannot {what} while mounted; run 'backupfs umount {record.mountpoint}' and try again"
        ) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise dead_mount_error(record) from None
        raise UsageError(f"{path}: {e.strerror}") from None
    return path


def _busy(path: str) -> str:
    """What keeps the control file busy: the command it runs, as its status xattr says."""
    try:
        fields = json.loads(os.getxattr(path, STATUS_XATTR))
    except (OSError, ValueError):
        fields = None
    if not isinstance(fields, dict) or fields.get("state") != "running":
        return "another repository command is running through the mount; try again when it is done"
    by = f", requested by {fields['requester']}" if fields.get("requester") else ""
    return escape(f"another repository command is running ({fields.get('command')}: "
                  f"{fields.get('progress') or 'starting'}{by}); try again when it is done")


def _watch_import(path: str, done: threading.Event) -> None:
    """Print each layer as the daemon starts it (stderr, a terminal only)."""
    shown = None
    while not done.wait(PROGRESS_POLL):
        try:
            status = json.loads(os.getxattr(path, STATUS_XATTR))
        except (OSError, ValueError):
            continue
        progress = status.get("progress") if isinstance(status, dict) else None
        if isinstance(progress, str) and progress != shown:
            shown = progress
            print(escape(progress), file=sys.stderr)


def run_through_mount(record: MountRecord, cmd: ControlCommand, what: str) -> dict[str, Any]:
    """Have the mount's daemon run ``cmd``; its outcome, or BackupfsError with its reason."""
    path = _control_file(record, what)
    line = cmd.line()
    if "\n" in line or "\r" in line:  # only a path can hold one: the name and options cannot
        raise UsageError(f"a path given holds a line break, which a command to the mount's {CONTROL_NAME} cannot "
                         f"carry (one line each); rename it, or run 'backupfs umount {record.mountpoint}' first")
    default_stop_signals()  # so that the daemon sees them as stopping us (requester.py)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise BackupfsError(f"{path}: only the mount's owner can {what} through it") from None
        if e.errno == errno.EBUSY:
            raise BackupfsError(f"{what}: {_busy(path)}") from None
        raise BackupfsError(f"{path}: {e.strerror}") from None
    done = threading.Event()
    watcher = None
    if isinstance(cmd, Import) and sys.stderr.isatty():
        watcher = threading.Thread(target=_watch_import, args=(path, done), daemon=True)
        with no_stops_in_new_threads():  # a Ctrl-C is the main thread's (engine/stopsignals.py)
            watcher.start()
    failure: OSError | None = None
    interrupted = False
    try:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as e:
            failure = e
        except KeyboardInterrupt:  # Ctrl-C: the daemon saw it too and cancelled
            interrupted = True
        finally:
            done.set()
            if watcher is not None:
                watcher.join()
        try:
            data = os.pread(fd, OUTCOME_MAX, 0)
        except OSError as e:
            raise BackupfsError(f"{what}: the mount at {record.mountpoint} went away ({e.strerror})") from None
    finally:
        close_quietly(fd)
    try:
        outcome = json.loads(data)
        state = outcome["state"]
    except (ValueError, KeyError, TypeError):
        raise BackupfsError(f"{what}: the mount at {record.mountpoint} gave no outcome"
                            + (f" ({failure.strerror})" if failure else "")) from None
    if interrupted:
        ended = "was cancelled; nothing of it was kept" if state == "cancelled" else f"had already ended ({state})"
        verb = cmd.line().split()[0].replace("-", " ")
        print(f"backupfs: interrupted: the {verb} of {escape(cmd.name)} {ended}", file=sys.stderr)
        raise SystemExit(130)  # as Ctrl-C ends every command, with this one line said
    if failure is not None or state != "succeeded":
        raise BackupfsError(str(outcome.get("error") or f"{what} failed: "
                                + (failure.strerror if failure else state)))
    return outcome


def device_add(record: MountRecord, name: str, source: str, granularity: int | None, raw: bool,
               replace: bool, compress: str | None = None, ceph_conf: str | None = None,
               ceph_id: str | None = None) -> int:
    if is_rbd(source):
        # Resolved here, in the caller's environment (CEPH_CONF), not the daemon's.
        ceph_conf = parse_rbd(source, ceph_conf, ceph_id).conf
    else:
        source = os.path.abspath(source)
    out = run_through_mount(record, DeviceAdd(name, source, granularity, raw, replace, compress, ceph_conf, ceph_id),
                            "add a device")
    d = out["device"]
    where = f" (through the mount at {escape(record.mountpoint)})"
    if replace:
        print(f"device {escape(d['name'])}: source rebound to {escape(d['source'])}; its next backup compares "
              f"checksums (nothing recorded what changed on it){where}")
        return 0
    packed = f", compress {d['compress']}" if d.get("compress", "none") != "none" else ""
    print(f"device {escape(d['name'])}: {escape(d['source'])}, {format_size(d['size'])}, "
          f"granularity {format_size(d['granularity'])}{packed}{where}")
    if out.get("attached"):
        print("its imported backups go on from this source; the next incremental compares checksums "
              "(nothing recorded what changed on it since)")
    return 0


def device_set(record: MountRecord, name: str, compress: str) -> int:
    out = run_through_mount(record, DeviceSet(name, compress), "change a device")
    print(f"device {escape(name)}: compress {out['device']['compress']} (for its next backups; "
          f"through the mount at {escape(record.mountpoint)})")
    return 0


def device_remove(record: MountRecord, name: str, force: bool) -> int:
    out = run_through_mount(record, DeviceRemove(name, force), "remove a device")
    count = int(out["backups_removed"])
    for note in out.get("notes") or []:
        print(f"backupfs: warning: {escape(str(note))}", file=sys.stderr)
    print(f"removed device {escape(name)}" + (f" and its {count} backup{'s' if count != 1 else ''}" if count else "")
          + f" (through the mount at {escape(record.mountpoint)})")
    return 0


def import_chain(record: MountRecord, name: str, tip: str, source: str | None, granularity: int | None,
                 allow_outside: list[str], backing_format: str | None, tip_format: str, raw: bool) -> int:
    cmd = Import(name, os.path.abspath(tip), os.path.abspath(source) if source is not None else None,
                 granularity, tuple(os.path.abspath(d) for d in allow_outside), backing_format, tip_format, raw)
    out = run_through_mount(record, cmd, "import a chain")
    for b in out["backups"]:
        print(f"{escape(b['id'])}\t{b['kind']}\t{format_size(b['stored_bytes'])}\t{escape(b['label'] or '')}")
    return 0
