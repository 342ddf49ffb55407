"""`backupfs verify | restore | prune | import`: operating a repository."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from backupfs.cli_common import Stopped, catalog_for_reading, close_quietly, default_stop_signals, progress_reporter
from backupfs.mountinfo import MountRecord, mount_holding, read_mount_record, trigger_file
from backupfs.cli_output import print_json
from backupfs.cli_remote import add_endpoint_option, restore_from_remote, verify_remote_cmd
from backupfs.mountstatus import (StatusFields, failure_message, job_lines, progress_text, read_status,
                                  verify_report)
from engine.errors import BackupfsError, UsageError
from engine.layout import matching_ids
from engine.stopsignals import STOP_SIGNALS, no_stops_in_new_threads
from engine.text import escape, one_line
from engine.units import format_size, parse_size

READ_ERROR_XATTR = "user.backupfs.read_error"  # backupfs/tree.py: why the mount failed a read

if TYPE_CHECKING:
    from engine.catalog import Catalog
    from engine.job import CancelRequest
    from engine.rbdimage import RbdImage
    from engine.sourceid import SourceId


RESTORE_EPILOG = """\
With --include PATH (repeatable): files and trees inside the backup are
copied into TARGET, an existing directory (not a symlink), keeping the path
below the volume as tar does: --include p2/etc/fstab makes TARGET/etc/fstab,
--include p2 puts the volume's contents in TARGET. All PATHs of one run are
in one volume. Modes, times, symlinks (never followed), hard links and
user.* xattrs are kept, owners when run as root. A symlink on the way in
TARGET is refused; an existing file is kept unless --force. Each file is
written under a temporary name and renamed when complete. An entry a
damaged guest filesystem cannot give is skipped and named (exit status 1).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check images, chain links and every stored cluster's checksum")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--backup", metavar="ID", help="only this backup")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: {ok, checked, bad, problems: [{backup, problem, offset, harms_reads}], "
                        "bytes_read} (README: Output for scripts); the exit status as without it")
    add_endpoint_option(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="write a backup out to a file (sparse), a block device or an RBD image "
                                        "(rbd:POOL/IMAGE), or copy files inside it into a directory (--include)",
                       epilog=RESTORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("backup", metavar="ID", help="a backup id, or 'latest'")
    p.add_argument("target", metavar="TARGET",
                   help="a file, a block device or rbd:POOL[/NAMESPACE]/IMAGE; with --include, a directory")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing file, a block device or an existing RBD image (resized to the "
                        "backup's size) (with --include: replace existing files and symlinks in the directory, "
                        "never a directory)")
    p.add_argument("--ceph-conf", metavar="FILE",
                   help="an rbd: target's cluster configuration (default: $CEPH_CONF, then /etc/ceph/ceph.conf)")
    p.add_argument("--ceph-id", metavar="NAME", help="the Ceph client to connect as (default: librados' own, admin)")
    p.add_argument("--include", action="append", metavar="PATH",
                   help="copy the file or tree PATH inside the backup (e.g. p2/etc/fstab) into the directory "
                        "TARGET instead of restoring the whole disk; repeatable")
    p.add_argument("--keep-special", action="store_true",
                   help="with --include, as root: keep the guest's setuid/setgid bits and make its device "
                        "nodes (left out by default: a guest's setuid-root program is root for whoever can "
                        "reach the directory); for a directory only root can reach")
    add_endpoint_option(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("prune", help="remove backups, merging each into the backups that depend on it")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--keep-last", type=int, metavar="N")
    p.add_argument("--keep-daily", type=int, metavar="N")
    p.add_argument("--keep-weekly", type=int, metavar="N")
    p.add_argument("--keep-monthly", type=int, metavar="N")
    p.add_argument("--remove", metavar="ID", help="remove this one backup")
    p.add_argument("--dry-run", action="store_true",
                   help="list every backup it would keep (and the rule that keeps it) and remove, and the bytes "
                        "it would free at most; change nothing")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("import", help="adopt a qcow2 chain made by QEMU or libvirt as a device's history")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("tip", metavar="TIP")
    p.add_argument("--source", metavar="PATH", help="the live disk, to continue the chain with new backups")
    p.add_argument("--granularity", default="64K", help="bitmap and checksum granularity (default 64K)")
    p.add_argument("--allow-outside", action="append", default=[], metavar="DIR",
                   help="also read backing files under DIR (by default only under the tip's directory); repeatable")
    p.add_argument("--backing-format", choices=("raw", "qcow2"),
                   help="the format of a backing file whose image records none (never guessed)")
    p.add_argument("--format", dest="tip_format", choices=("raw", "qcow2"), default="qcow2",
                   help="the tip's format (default qcow2; never told from its first bytes, which in a "
                        "raw disk its guest chose): give raw to import a raw disk")
    p.add_argument("--raw", action="store_true",
                   help="take the --source as raw bytes even when it holds a disk image format (refused otherwise)")
    p.set_defaults(func=cmd_import)


def _mounted(repo: str) -> MountRecord | None:
    return read_mount_record(os.path.abspath(repo))


@contextlib.contextmanager
def _mounted_progress(snapshot: str, label: str | None) -> Iterator[None]:
    """While the daemon runs the job, draw its progress (as its status gives
    it) on a terminal; nothing when ``label`` is None or not a terminal."""
    if label is None or not sys.stderr.isatty():
        yield
        return
    import threading

    from engine.job import Progress

    done = threading.Event()

    def show() -> None:
        with progress_reporter(True, label) as update:
            assert update is not None
            while not done.wait(0.2):
                try:
                    p = read_status(snapshot)["progress"]
                except (OSError, BackupfsError):
                    return  # the mount went away: the write says so
                if p is not None:
                    update(Progress(total=p["total"], done=p["done"], phase=p["phase"]))

    watcher = threading.Thread(target=show, daemon=True)
    with no_stops_in_new_threads():  # a Ctrl-C is the main thread's (engine/stopsignals.py)
        watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _trigger_through_mount(record: MountRecord, name: str, line: str,
                           progress: str | None = None) -> tuple[StatusFields, OSError | None]:
    """Write a command line to the device's snapshot file; return the job's
    status and what the write said (None: it succeeded). ``progress``: the
    label of a progress bar drawn on a terminal meanwhile."""
    default_stop_signals()  # so that the daemon sees them as stopping us (requester.py)

    snapshot = trigger_file(record, name)
    failure: OSError | None = None
    try:
        fd = os.open(snapshot, os.O_WRONLY)
        try:
            with _mounted_progress(snapshot, progress):
                os.write(fd, (line + "\n").encode())
        finally:
            close_quietly(fd)
    except OSError as e:
        failure = e
    fields = read_status(snapshot)
    if failure is not None and failure.errno == errno.EBUSY:
        raise BackupfsError(
            f"a job of {name} is already running ({fields['command'] or '?'}: "
            f"{progress_text(fields, 'in progress')}); try again when it is done"
        )
    return fields, failure


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repo.startswith("s3://"):
        return verify_remote_cmd(args)
    if args.endpoint is not None:
        raise UsageError("--endpoint goes with an s3:// URL")
    from engine.integrity import VerifyReport
    from engine.job import Progress
    from engine.repo import Repository

    record = _mounted(args.repo)
    if record is not None:
        names = [args.name] if args.name else None
        if names is None:
            with catalog_for_reading(args.repo) as catalog:
                names = [d.name for d in catalog.devices()]
        ok = True
        whole = VerifyReport()  # --json: every device's report in one
        for name in names:
            line = "verify" + (f" backup={args.backup}" if args.backup else "")
            fields, failure = _trigger_through_mount(record, name, line)
            snapshot = os.path.join(record.mountpoint, name, "snapshot")
            report_lines = [line[len("report: "):] for line in job_lines(snapshot, fields)
                            if line.startswith("report: ")]
            if report_lines and not args.json:
                print("\n".join(one_line(line) for line in report_lines))
            if failure is not None:
                ok = False
                if fields["state"] != "failed" or not report_lines:
                    raise BackupfsError(failure_message(fields) or f"verify failed: {failure.strerror or ''}")
            if args.json:
                whole.merge(VerifyReport.from_data(verify_report(snapshot, fields)))
        if args.json:
            print_json(whole.data())
        return 0 if ok else 1
    with Repository.open(args.repo) as repo:
        total = sum(b.stored_bytes for b in repo.backups(args.name)) if not args.backup else 0
        with progress_reporter(sys.stderr.isatty() and total > 0, "verify") as update:
            progress = Progress(total=total, phase="verifying")

            def on_bytes(n: int) -> None:
                progress.done += n
                if update is not None:
                    update(progress)

            report = repo.verify(args.name, args.backup, on_bytes)
    if args.json:
        print_json(report.data())
    else:
        print(report.render())
    return 0 if report.ok else 1


def _in_place(target: str) -> str | None:
    """What ``target`` is when it is a device file on a backupfs mount, which
    a restore writes in place (through the mount, so its bitmap records the
    change); None for a target elsewhere. Any other path on a mount is refused:
    nothing else there takes a write."""
    held = mount_holding(target)
    if held is None:
        return None
    mountpoint, inside = held
    parts = inside.split(os.sep)
    if len(parts) == 2 and parts[1] == "device":
        return f"the device file of {parts[0]} on the backupfs mount at {mountpoint}"
    raise UsageError(
        f"restore target {target} lies on the backupfs mount at {mountpoint}, where only a device "
        f"file ({os.path.join(mountpoint, 'NAME', 'device')}) can be restored into"
    )


def cmd_restore(args: argparse.Namespace) -> int:
    from engine.ceph import is_rbd

    if args.repo.startswith("s3://"):
        if is_rbd(args.target):
            raise UsageError("a restore from an s3:// remote writes a file or a block device; restore it into "
                             "an RBD image from a repository (a local one, or a copy of the remote)")
        if args.include:
            from backupfs.cli_files import cmd_restore_files

            return cmd_restore_files(args)
        return restore_from_remote(args)
    if args.endpoint is not None:
        raise UsageError("--endpoint goes with an s3:// URL")
    if is_rbd(args.target):
        return _restore_rbd(args)
    if args.ceph_conf is not None or args.ceph_id is not None:
        raise UsageError(f"--ceph-conf and --ceph-id are for rbd: targets, not {escape(args.target)}")
    if args.include:
        from backupfs.cli_files import cmd_restore_files

        return cmd_restore_files(args)
    from engine.repo import Repository

    in_place = _in_place(args.target)
    record = _mounted(args.repo)
    if record is not None:
        return _restore_through_mount(record, args, in_place)
    with Repository.open(args.repo) as repo:
        with progress_reporter(sys.stderr.isatty(), f"restore {args.name}") as update:
            result = repo.restore(args.name, args.backup, args.target, force=args.force, in_place=in_place,
                                  on_progress=update)
    print(one_line(result.summary(args.name)))
    return 0


def _restore_rbd(args: argparse.Namespace) -> int:
    """`restore REPO NAME ID rbd:POOL/IMAGE`: into an RBD image (engine/rbdrestore.py)."""
    if args.include:
        raise UsageError("--include copies files into a directory; an rbd: target takes the whole disk")
    record = _mounted(args.repo)
    if record is not None:
        return _restore_rbd_through_mount(record, args)
    from engine.repo import Repository

    try:
        with Repository.open(args.repo) as repo:
            with progress_reporter(sys.stderr.isatty(), f"restore {args.name}") as update:
                result = repo.restore_rbd(args.name, args.backup, args.target, ceph_conf=args.ceph_conf,
                                          ceph_id=args.ceph_id, force=args.force, on_progress=update)
    except KeyboardInterrupt as e:
        _say_notes(e)
        raise
    print(one_line(result.summary(args.name)))
    return 0


def _say_notes(e: BaseException) -> None:
    """What a stopped restore left (engine/rbdrestore.py notes it on the stop)."""
    for note in getattr(e, "__notes__", ()):
        print(f"backupfs: {one_line(note)}", file=sys.stderr)


def _restore_rbd_through_mount(record: MountRecord, args: argparse.Namespace) -> int:
    """Mounted: read the backup through the mount (the daemon checks checksums),
    write the image from here. The image of a mounted device is refused: the
    mount has it open, and its device file is the way to write it."""
    from engine.ceph import parse
    from engine.rbdrestore import rbd_source_named, restore_to_rbd

    spec = parse(args.target, args.ceph_conf, args.ceph_id)
    with catalog_for_reading(args.repo) as catalog:
        if catalog.device(args.name) is None:
            raise UsageError(f"no device named {args.name!r}")
        devices = catalog.devices()
        ident = _mounted_backup_id(args, catalog)

    def claim(image: RbdImage | None, identity: SourceId | None) -> None:
        d = rbd_source_named(spec, identity, devices)
        if d is not None:
            raise UsageError(
                f"{spec.source} is the source of device {d.name}, which is mounted at {record.mountpoint}; "
                f"restore into {os.path.join(record.mountpoint, d.name, 'device')} (in place, through the "
                f"mount) or run 'backupfs umount {record.mountpoint}' first")

    claim(None, None)  # by name, before the cluster is reached
    with _mounted_backup(record, args, ident) as (read, size, ident):
        with progress_reporter(sys.stderr.isatty(), f"restore {args.name}") as update:
            try:
                result = restore_to_rbd(read, size, spec, force=args.force, on_progress=update, claim=claim)
            except KeyboardInterrupt as e:
                _say_notes(e)
                raise
    result.backup = ident
    print(one_line(result.summary(args.name, " through the mount")))
    return 0


def _restore_through_mount(record: MountRecord, args: argparse.Namespace, in_place: str | None) -> int:
    """Mounted: read the backup through the mount (the daemon checks checksums)."""
    from engine.restore import check_in_place_target, check_target, restore_to

    from engine.restore import source_named

    with catalog_for_reading(args.repo) as catalog:
        if catalog.device(args.name) is None:
            raise UsageError(f"no device named {args.name!r}")
        d = source_named(args.target, catalog.devices())
        if d is not None:
            raise UsageError(
                f"{args.target} is the source of device {d.name}, which is mounted at "
                f"{record.mountpoint}; restore into {os.path.join(record.mountpoint, d.name, 'device')} (in place, "
                f"through the mount) or run 'backupfs umount {record.mountpoint}' first"
            )
        ident = _mounted_backup_id(args, catalog)
    with _mounted_backup(record, args, ident) as (read, size, ident):
        if in_place is not None:
            kind = check_in_place_target(args.target, size, args.force, in_place)
        else:
            kind = check_target(args.target, size, args.force, os.path.abspath(args.repo))
        with progress_reporter(sys.stderr.isatty(), f"restore {args.name}") as update:
            result = restore_to(read, size, args.target, kind=kind, on_progress=update,
                                repository=os.path.abspath(args.repo))
    result.backup = ident
    print(one_line(result.summary(args.name, " through the mount")))
    return 0


def _mounted_backup_id(args: argparse.Namespace, catalog: Catalog) -> str:
    """The backup ``args.backup`` names, as the mount's backups/ directory
    names it: a suffix as people type it (0002) made whole, as the unmounted
    restore takes it; 'latest' stays (the mount resolves it)."""
    ident = str(args.backup)
    if ident != "latest":
        found = matching_ids(ident, [b.id for b in catalog.backups(args.name)])
        if len(found) > 1:
            raise UsageError(f"{ident!r} names more than one backup of {args.name}: " + ", ".join(found))
        ident = found[0] if found else ident
    return ident


@contextlib.contextmanager
def _mounted_backup(record: MountRecord, args: argparse.Namespace, ident: str
                    ) -> Iterator[tuple[Callable[[int, memoryview], memoryview], int, str]]:
    """(read, size, id) of backup ``ident`` opened through the mount, for a
    restore: ``read(offset, out)`` fills ``out``; its errors say why the mount
    failed the read."""
    backups = os.path.join(record.mountpoint, args.name, "backups")
    if ident == "latest":
        try:
            ident = os.readlink(os.path.join(backups, ident))  # then 'latest' cannot move under us
        except FileNotFoundError:
            raise UsageError(f"device {args.name} has no backup {args.backup!r}") from None
    path = os.path.join(backups, ident)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise UsageError(f"device {args.name} has no backup {args.backup!r}") from None
    except OSError as e:  # a damaged image the mount cannot open: say why, as a failed read does
        raise BackupfsError(f"opening backup {escape(ident)} through the mount: {e.strerror}: "
                            f"{_read_error(path, record)}") from None

    def read(offset: int, out: memoryview) -> memoryview:
        try:
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + done)
                if n == 0:
                    break  # the mount's file ended early: the restore reports the short read
                done += n
            return out[:done]
        except OSError as e:
            raise BackupfsError(f"reading backup {escape(ident)} through the mount at offset {offset}: "
                                f"{e.strerror}: {_read_error(path, record)}; 'backupfs verify "
                                f"{escape(args.repo)} {escape(args.name)}' checks the whole device") from None

    try:
        yield read, os.fstat(fd).st_size, ident
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # only read from; a dead mount fails this too, and the error on its way says more


def _read_error(path: str, record: MountRecord) -> str:
    """Why the mount failed a read of the backup at ``path``, as its daemon
    keeps it (user.backupfs.read_error); else where to look."""
    try:
        reason = os.getxattr(path, READ_ERROR_XATTR).decode(errors="replace")
    except OSError:
        reason = ""
    if reason:
        return one_line(reason)
    return f"the reason is in the mount's log ({escape(os.path.join(record.repo, 'backupfs.log'))})"


@contextlib.contextmanager
def _first_signal_cancels(cancel: CancelRequest, current: str) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM, SIGHUP) sets ``cancel``, for work that
    stops cleanly between steps (a prune, between removals); a second one
    stops at once.

    A prune stopped anywhere is safe (a removal cut short is finished at
    the next open), but only a stop between removals can say what was
    removed: the operator needs that list to know what is left. A signal
    the process was started ignoring (a script's `&` job, nohup) stays
    ignored.
    """
    def on_signal(signum: int, frame: object) -> None:
        if cancel.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Stopped(signum)
        cancel.cancel("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name, interrupted=True)
        print(f"backupfs: stopping after {current} (again to stop at once)", file=sys.stderr)

    previous = {}
    for sig in sorted(STOP_SIGNALS):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_prune(args: argparse.Namespace) -> int:
    from engine.prune import RetentionPolicy
    from engine.repo import Repository

    policy = RetentionPolicy(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    # Checked here, mounted or not: the same words either way, not the trigger file's.
    if policy.empty() == (args.remove is None):
        raise UsageError("give either a retention rule or --remove ID")
    policy.validate()
    record = _mounted(args.repo)
    if record is not None:
        parts = ["prune"]
        for key in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly"):
            if getattr(args, key) is not None:
                parts.append(f"{key}={getattr(args, key)}")
        if args.remove:
            parts.append(f"remove={args.remove}")
        if args.dry_run:
            parts.append("dry_run=1")
        fields, failure = _trigger_through_mount(record, args.name, " ".join(parts),
                                                 progress=None if args.dry_run else f"prune {args.name}")
        if failure is not None:
            raise BackupfsError(failure_message(fields) or f"prune failed: {failure.strerror or ''}")
        for line in job_lines(os.path.join(record.mountpoint, args.name, "snapshot"), fields):
            if line.startswith(("removed: ", "would remove: ", "keep: ", "would free: ")):
                print(one_line(line))
        return 0
    if args.dry_run:
        with Repository.open(args.repo, writable=False) as repo:  # nothing changes, not even a leftover
            preview = repo.prune_preview(args.name, None if policy.empty() else policy, args.remove)
        for line in preview.lines():
            print(one_line(line))
        return 0
    from engine.job import CancelRequest, JobCancelled

    cancel = CancelRequest()
    with _first_signal_cancels(cancel, "the backup being removed now"):
        try:
            with Repository.open(args.repo) as repo, \
                    progress_reporter(sys.stderr.isatty(), f"prune {args.name}") as update:
                plans = repo.prune(args.name, None if policy.empty() else policy, args.remove,
                                   cancel=cancel, on_progress=update)
        except JobCancelled as e:
            for plan in e.removed:
                print(f"removed: {plan.describe()}")
            print(f"backupfs: interrupted: {e}", file=sys.stderr)
            return 130 if cancel.reason == "Ctrl-C" else 128 + int(signal.Signals[cancel.reason or "SIGINT"])
    for plan in plans:
        print(f"removed: {plan.describe()}")
    if not plans:
        print("nothing to remove")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from engine.repo import DEFAULT_GRANULARITY, Repository

    from engine.job import Progress

    granularity = parse_size(args.granularity, "granularity")
    record = _mounted(args.repo)
    if record is not None:  # the daemon's to do (backupfs/cli_control.py)
        from backupfs.cli_control import import_chain

        return import_chain(record, args.name, args.tip, args.source, granularity or DEFAULT_GRANULARITY,
                            args.allow_outside, args.backing_format, args.tip_format, args.raw)
    with Repository.open(args.repo) as repo, \
            progress_reporter(sys.stderr.isatty(), f"import {args.name}") as update:
        image = ["image"]

        def on_layer(n: int, total: int, path: str) -> None:
            image[0] = f"image {n + 1} of {total}"

        def on_progress(p: Progress) -> None:
            if update is not None:
                update(Progress(total=p.total, done=p.done, written=p.written, started=p.started, phase=image[0]))

        records = repo.import_chain(args.name, args.tip, granularity or DEFAULT_GRANULARITY, args.source, on_layer,
                                    args.allow_outside, args.backing_format, args.tip_format,
                                    raw_source=args.raw, on_progress=on_progress)
    for rec in records:
        print(f"{escape(rec.id)}\t{rec.kind}\t{format_size(rec.stored_bytes)}\t{escape(rec.label or '')}")
    return 0
