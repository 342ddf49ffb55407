"""`backupfs init | device | backup | list | status`: the repository from the shell."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from backupfs.cli_common import catalog_for_reading, close_quietly, default_stop_signals, progress_reporter
from backupfs.cli_output import (BACKUP_HEADER, DEVICE_HEADER, backup_data, backup_row, device_data, device_row,
                                 on_terminal, print_json, print_table)
from backupfs.cli_remote import add_endpoint_option, catalog_or_remote
from backupfs.mountinfo import MountRecord, dead_mount, read_mount_record, refuse_dead_mount, trigger_file
from backupfs.mountstatus import StatusFields, failure_message, progress_text, read_status
from backupfs.trigger import TriggerCommand
from engine.catalog import KINDS, Catalog, DeviceRecord
from engine.errors import BackupfsError, UsageError
from engine.qcow2.format import COMPRESS_CHOICES
from engine.stopsignals import no_stops_in_new_threads
from engine.text import escape, one_line
from engine.units import check_rate, format_size, parse_size

if TYPE_CHECKING:
    from engine.repo import Repository

# The engine (numpy and all) is imported by the commands that use it, so
# that `backupfs image ...` and --help start fast.


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create an empty repository (private: only its owner can read it)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--group", metavar="GROUP",
                   help="let this group read the repository too (directories 2750, files 0640)")
    p.set_defaults(func=cmd_init)

    dev = sub.add_parser("device", help="register, list or remove devices")
    dsub = dev.add_subparsers(dest="device_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser(
        "add", help="register a device: a raw image file, a block device or a Ceph RBD image "
                    "(or give an imported one its source)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("source", metavar="SOURCE",
                   help="a raw image file, a block device, or rbd:POOL/IMAGE (rbd:POOL/NAMESPACE/IMAGE)")
    p.add_argument("--granularity", help="dirty bitmap granularity (512 to 64M, default 64K)")
    p.add_argument("--replace", action="store_true",
                   help="rebind an existing device to SOURCE on purpose (another path, or the file now at its "
                        "path); same size; its next backup scans")
    p.add_argument("--raw", action="store_true",
                   help="take SOURCE as raw bytes even when it holds a disk image format (qcow2, VMDK, VHD, "
                        "VHDX, VDI), which is refused otherwise: its backups hold the image file itself")
    p.add_argument("--compress", choices=COMPRESS_CHOICES,
                   help="how its backups store clusters unless a backup says otherwise (default none)")
    p.add_argument("--ceph-conf", metavar="FILE",
                   help="an rbd: source's cluster configuration (default: $CEPH_CONF, then /etc/ceph/ceph.conf)")
    p.add_argument("--ceph-id", metavar="NAME", help="the Ceph client to connect as (default: librados' own, admin)")
    p.set_defaults(func=cmd_device_add)
    p = dsub.add_parser("set", help="change a device's settings (for its next backups)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--compress", choices=COMPRESS_CHOICES, required=True,
                   help="its backups' default compression: zstd-compressed clusters, or none")
    p.set_defaults(func=cmd_device_set)
    p = dsub.add_parser("list", help="the registered devices")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--json", action="store_true",
                   help="a JSON list of {name, source, size, granularity, compress} (bytes)")
    p.set_defaults(func=cmd_device_list)
    p = dsub.add_parser("remove", help="forget a device and delete its backups")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="also when it has backups: they are deleted")
    p.set_defaults(func=cmd_device_remove)

    p = sub.add_parser("backup", help="take a backup: full, incremental or differential")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("kind", metavar="KIND", choices=KINDS)
    p.add_argument("--cluster-size", default="64K", help="qcow2 cluster size of the new image (512 to 2M)")
    p.add_argument("--scan", action="store_true", help="compare checksums instead of trusting the bitmap")
    p.add_argument("--label", help="free text stored with the backup")
    p.add_argument("--auto-full", action="store_true",
                   help="take a full backup if there is none yet, or if the chain holds a backup verify found damaged")
    p.add_argument("--force", action="store_true",
                   help="try a full backup even when it may not fit the repository's disk")
    p.add_argument("--rate", help="limit the copy to this many bytes per second, e.g. 50M")
    p.add_argument("--allow-empty", action="store_true",
                   help="when nothing changed since the last backup, still add an (empty) backup as a point "
                        "in time; without it, an incremental or differential with nothing to copy makes none")
    p.add_argument("--compress", choices=COMPRESS_CHOICES,
                   help="store zstd-compressed clusters (or not); default: the device's (device set --compress)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", help="the backups (first column: the backup id); of a remote too")
    p.add_argument("repo", metavar="REPO",
                   help="the repository; or a remote, s3://BUCKET/PREFIX, or a copy of one on disk")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="a JSON list of {id, device, kind, parent, created (ISO 8601 UTC), created_ns, size, "
                        "cluster_size, granularity, stored_bytes, label, image} (sizes in bytes)")
    p.add_argument("--kind", choices=KINDS,
                   help="only backups of this kind, as they are now (a backup whose full was pruned is a full)")
    add_endpoint_option(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="devices, bitmap state, recent jobs")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: {repository, mounted, mountpoint, devices: [{name, source, size, "
                        "bitmap, job, latest_backup, recent_jobs, error}], ...} (README: Output for scripts)")
    p.set_defaults(func=cmd_status)


def cmd_init(args: argparse.Namespace) -> int:
    from engine.access import resolve_group
    from engine.repo import Repository

    Repository.init(args.repo, resolve_group(args.group) if args.group is not None else None)
    print(f"initialised backupfs repository {escape(args.repo)}")
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    granularity = parse_size(args.granularity, "granularity") if args.granularity is not None else None
    if args.replace:
        if granularity is not None:
            raise UsageError("--replace keeps the device's granularity; leave out --granularity")
        if args.compress is not None:
            raise UsageError("--replace keeps the device's settings; change compression with "
                             "'backupfs device set REPO NAME --compress'")
    record = read_mount_record(os.path.abspath(args.repo))
    if record is not None:  # the daemon's to do (backupfs/cli_control.py)
        from backupfs.cli_control import device_add

        return device_add(record, args.name, args.source, granularity, args.raw, args.replace, args.compress,
                          args.ceph_conf, args.ceph_id)
    ceph = {"ceph_conf": args.ceph_conf, "ceph_id": args.ceph_id}
    if args.replace:
        notes: list[str] = []
        with Repository.open(args.repo) as repo:
            rec = repo.replace_source(args.name, args.source, raw=args.raw, notes=notes, **ceph)
        for note in notes:
            print(f"backupfs: warning: {note}", file=sys.stderr)
        print(f"device {rec.name}: source rebound to {escape(rec.source)}; its next backup compares checksums "
              "(nothing recorded what changed on it)")
        return 0
    with Repository.open(args.repo) as repo:
        before = repo.device_record(args.name)
        attach = before is not None and not before.source  # an imported archive
        rec = repo.add_device(args.name, args.source, granularity, raw=args.raw, compress=args.compress, **ceph)
    print(f"device {rec.name}: {escape(rec.source)}, {format_size(rec.size)}, "
          f"granularity {format_size(rec.granularity)}" + (f", compress {rec.compress}" if rec.compress != "none"
                                                            else ""))
    if attach:
        print("its imported backups go on from this source; the next incremental compares checksums "
              "(nothing recorded what changed on it since)")
    return 0


def cmd_device_set(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    record = read_mount_record(os.path.abspath(args.repo))
    if record is not None:  # the daemon's to do (backupfs/cli_control.py)
        from backupfs.cli_control import device_set

        return device_set(record, args.name, args.compress)
    with Repository.open(args.repo) as repo:
        rec = repo.set_device(args.name, compress=args.compress)
    print(f"device {rec.name}: compress {rec.compress} (for its next backups)")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    with catalog_for_reading(args.repo) as catalog:
        devices = catalog.devices()
    if args.json:
        print_json([device_data(d) for d in devices])
        return 0
    tty = on_terminal()
    print_table(DEVICE_HEADER, [device_row(d, tty) for d in devices], tty=tty, header_when_piped=False)
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    record = read_mount_record(os.path.abspath(args.repo))
    if record is not None:  # the daemon's to do (backupfs/cli_control.py)
        from backupfs.cli_control import device_remove

        return device_remove(record, args.name, args.force)
    with Repository.open(args.repo) as repo:
        if repo.device_record(args.name) is None:
            raise UsageError(f"no device named {args.name!r}")
        count = len(repo.backups(args.name))
        if count and not args.force:
            raise UsageError(f"device {args.name} has {count} backup{'s' if count != 1 else ''}; removing it "
                             "deletes them all (use --force)")
        notes = repo.remove_device(args.name)
    for note in notes:
        print(f"backupfs: warning: {note}", file=sys.stderr)
    print(f"removed device {args.name}" + (f" and its {count} backup{'s' if count != 1 else ''}" if count else ""))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    from engine.qcow2.writer import validate_cluster_size
    from engine.validate import validate_label

    cluster_size = parse_size(args.cluster_size, "cluster size")
    rate = check_rate(parse_size(args.rate, "rate"), "--rate") if args.rate else None
    # Here, mounted or not: the same words either way, not the trigger file's.
    validate_cluster_size(cluster_size)
    if args.label is not None:
        validate_label(args.label)
    record = read_mount_record(os.path.abspath(args.repo))
    if record is not None:
        return _backup_through_mount(record, args, cluster_size, rate)
    with Repository.open(args.repo) as repo:
        with progress_reporter(sys.stderr.isatty(), f"{args.name} {args.kind}") as progress:
            result = repo.backup(
                args.name,
                args.kind,
                cluster_size=cluster_size,
                scan=args.scan,
                label=args.label,
                auto_full=args.auto_full,
                on_progress=progress,
                rate=rate,
                force=args.force, allow_empty=args.allow_empty, compress=args.compress,
            )
    print(result.summary())
    return 0


def _backup_through_mount(
    record: MountRecord, args: argparse.Namespace, cluster_size: int, rate: int | None
) -> int:
    """The repository is mounted: ask the daemon through the trigger file."""
    from engine.job import Progress
    from engine.repo import validate_name

    validate_name(args.name)
    snapshot = trigger_file(record, args.name)
    cmd = TriggerCommand(args.kind, cluster_size, args.label, args.scan, args.auto_full, rate, force=args.force,
                         empty=args.allow_empty, compress=args.compress)
    done = threading.Event()

    def show_progress() -> None:
        with progress_reporter(True, f"{args.name} {args.kind}") as update:
            assert update is not None
            while not done.wait(0.2):
                p = read_status(snapshot)["progress"]
                if p is not None:  # running, and under way
                    update(Progress(total=p["total"], done=p["done"], phase="via mount"))

    watcher = threading.Thread(target=show_progress, daemon=True) if sys.stderr.isatty() else None
    interrupted = False
    default_stop_signals()  # so that the daemon sees them as stopping us (requester.py)
    if watcher is not None:
        with no_stops_in_new_threads():  # a Ctrl-C is the main thread's (engine/stopsignals.py)
            watcher.start()
    try:
        try:
            fd = os.open(snapshot, os.O_WRONLY)
        except OSError as e:
            failure: OSError | None = e
        else:
            try:
                os.write(fd, (cmd.line() + "\n").encode())
                failure = None
            except OSError as e:
                failure = e
            except KeyboardInterrupt:  # Ctrl-C: the mount saw it too and cancelled the job
                interrupted = True
                failure = None
            finally:
                close_quietly(fd)
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
    fields: StatusFields | None = None
    gone = ""
    try:
        fields = read_status(snapshot)
    except OSError as e:  # the mount went away (unmounted or killed) during the job
        if failure is None and not interrupted:
            raise BackupfsError(f"the backup ended, but its status cannot be read from {snapshot}: "
                                f"{e.strerror}") from None
        gone = e.strerror or str(e)
    state = fields["state"] if fields is not None else None
    if interrupted:
        if state == "cancelled":
            print(f"backupfs: interrupted: the backup of {args.name} was cancelled; no backup was made, bitmap kept",
                  file=sys.stderr)
        else:
            print(f"backupfs: interrupted: the backup of {args.name} had already ended ({state or '?'})",
                  file=sys.stderr)
        return 130
    if failure is not None:
        message = failure_message(fields) if fields is not None else None
        if fields is not None and state == "cancelled":
            message = f"the backup of {args.name} was cancelled: {fields['error'] or 'on request'}; no backup was made"
        elif fields is None:
            message = (f"backup failed: {failure.strerror}; the mount at {record.mountpoint} went away "
                       f"({gone})")
        if failure.errno == errno.EBUSY:
            progress = progress_text(fields, "in progress") if fields is not None else "in progress"
            message = f"a backup of {args.name} is already running ({progress})"
        raise BackupfsError(message or f"backup failed: {failure.strerror}")
    assert fields is not None
    _print_mounted_result(fields, record)
    return 0


def _print_mounted_result(fields: StatusFields, record: MountRecord) -> None:
    """The backup the mount took, in the words of an unmounted one."""
    r = fields["result"]
    if r is None:
        raise BackupfsError(f"the backup ended, but the mount reports no backup made (state {fields['state']})")
    since = r.get("unchanged_since")
    if since:
        print(f"nothing changed since {escape(since)}; no backup was made "
              f"({'scanned, ' if r['scanned'] else ''}{r['bytes_examined']} bytes examined in {r['seconds']:.2f} s, "
              f"through the mount at {escape(record.mountpoint)})")
        return
    print(
        f"{escape(r['backup'])}: {r['kind']}, "
        f"{'scanned, ' if r['scanned'] else ''}"
        f"{r['bytes_stored']} bytes stored of {r['bytes_examined']} examined "
        f"in {r['seconds']:.2f} s (through the mount at {escape(record.mountpoint)})"
    )


def _status_of_busy(repo: str, why: str) -> int:
    """Status while another command holds the repository: what its catalog
    says (its bitmaps are that command's to tell)."""
    print(f"not mounted; {one_line(why.removeprefix(f'repository {os.path.abspath(repo)} is '))}")
    with catalog_for_reading(repo) as catalog:
        for d in catalog.devices():
            print(_device_line(d))
            _print_history(catalog, d.name)
    return 0


def _print_history(catalog: Catalog | Repository, device: str) -> None:
    """The latest backup and the last jobs, as the catalog records them."""
    latest = catalog.latest_backup(device)
    print(f"  latest backup: {escape(latest.id) if latest else 'none'}")
    for j in catalog.jobs(device, limit=3):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(j.started_ns / 1e9))
        extra = f": {escape(j.error)}" if j.error else ""
        if j.state == "unchanged" and j.backup:
            extra = f": nothing changed since {escape(j.backup)}"
        print(f"  job {j.id} {escape(j.kind)} {when} {escape(j.state)}{extra}")


def _device_line(d: DeviceRecord) -> str:
    """A device as every status shows it: name, source, size, granularity."""
    source = escape(d.source) if d.source else "no live source (imported)"
    return f"{escape(d.name)}: {source}, {format_size(d.size)}, granularity {format_size(d.granularity)}"


def cmd_list(args: argparse.Namespace) -> int:
    with catalog_or_remote(args.repo, args.endpoint) as catalog:
        if args.name is not None and catalog.device(args.name) is None:
            raise UsageError(f"no device named {args.name!r}")
        rows = catalog.backups(args.name)
    if args.kind is not None:  # the kind it is now: a child whose full was pruned is a full
        rows = [b for b in rows if b.kind == args.kind]
    if args.json:
        print_json([backup_data(b) for b in rows])
        return 0
    tty = on_terminal()
    print_table(BACKUP_HEADER, [backup_row(b, tty) for b in rows], tty=tty, header_when_piped=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    if args.json:
        from backupfs.statusdata import status_document

        doc, failed = status_document(args.repo)
        print_json(doc)
        return 1 if failed else 0

    record = read_mount_record(os.path.abspath(args.repo))
    if record is not None:
        refuse_dead_mount(args.repo, record, "status again")
        from backupfs.mountaccess import describe_options

        options = f"; -o {escape(describe_options(record.options))}" if record.options else ""
        print(f"mounted at {escape(record.mountpoint)} (daemon pid {record.pid}{options})")
        failed = False
        with catalog_for_reading(args.repo) as catalog:
            for d in catalog.devices():
                base = os.path.join(record.mountpoint, d.name)
                print(_device_line(d))
                for name in ("bitmap", "snapshot"):
                    try:
                        with open(os.path.join(base, name)) as f:
                            text = f.read()
                    except OSError as e:  # one device's trouble: show it, go on
                        text = f"{name}: unavailable ({e.strerror})"
                        failed = True
                    for line in text.splitlines():
                        print(f"  {one_line(line)}")
                _print_history(catalog, d.name)
        return 1 if failed else 0
    try:
        repo = Repository.open(args.repo, writable=False)  # status deletes nothing
    except BackupfsError as e:
        if getattr(e, "errno", None) != errno.EBUSY:
            raise
        return _status_of_busy(args.repo, str(e))
    with repo:
        dead = dead_mount(os.path.abspath(args.repo))
        print("not mounted" if dead is None else
              f"not mounted: the mount at {escape(dead)} is dead (its daemon is gone); run 'backupfs umount {escape(dead)}'")
        failed = dead is not None
        for d in repo.devices():
            print(_device_line(d))
            if d.source:  # an imported archive has no bitmap to show
                try:
                    dev = repo.device(d.name)
                except BackupfsError as e:  # one device's trouble: show it, go on with the rest
                    print(f"  bitmap: unavailable: {one_line(str(e))}")
                    failed = True
                else:
                    state = "trusted" if dev.trusted else f"untrusted ({one_line(str(dev.untrusted_reason))})"
                    since_last, since_full = dev.dirty_bytes()
                    print(f"  bitmap: {state}; dirty since last backup "
                          f"{format_size(since_last)}, "
                          f"since last full {format_size(since_full)}")
            _print_history(repo, d.name)
    return 1 if failed else 0
