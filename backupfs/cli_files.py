"""`backupfs ls | dump` and `restore ... --include`: the guest's files in a backup, without a mount.

Thin over the engine (engine/guest/, through ``Repository.open_files``):
the volumes and filesystems are parsed in user space from the backup's
bytes, so none of this needs root, a loop device or the kernel's
filesystem code. Formatting is in guestls, streaming in guestdump, the
careful writing into a host directory in guestrestore; this module parses
arguments, opens the backup and turns what went wrong into one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from engine.errors import BackupfsError, UsageError
from engine.text import escape, one_line

from backupfs.cli_remote import add_endpoint_option, remote_backup_files
from backupfs.mountinfo import read_mount_record

if TYPE_CHECKING:
    from engine.guest.guestdisk import GuestDisk

    from backupfs.guestwalk import Target

# The guest parsers (Dissect) and the engine are imported by the commands
# that use them: every other command, and --help, starts without them.

LS_EPILOG = """\
Without PATH: the volumes of the backup (p1, p2 ... as fdisk numbers
partitions, disk for a filesystem on the whole device, lvm-VG-LV).
With PATH (p2, p2/etc): a directory's entries, names in byte order; a file
lists itself. -l: mode, links, uid, gid, size, mtime (UTC), name, and
'-> target' for a symlink; for volumes: offset, size, filesystem, label,
state. -R: everything below PATH, as paths relative to it. Names that are
not UTF-8 or hold control characters are shown escaped (\\xNN, \\n).
--json: one JSON list; each entry has name, path (from the volume, e.g.
p2/etc/fstab), type, mode (permission bits as a number), uid, gid, size,
nlink, mtime_ns, and target for a symlink. A name, path or target that is
not valid UTF-8 is given escaped, with its exact bytes in base64 beside it
as name_b64, path_b64, target_b64.
"""

DUMP_EPILOG = """\
A regular file: its bytes. A directory (or a volume, e.g. p2): a tar stream
(GNU format, numeric owners, modes, mtimes, symlinks, hard links, FIFOs and
device nodes) whose member names are the paths below the volume, so
'dump REPO DEV ID p2/etc | tar -x -C DIR' makes DIR/etc, as
'restore REPO DEV ID DIR --include p2/etc' does. Refuses a terminal as
standard output.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the volumes and files inside a backup (no mount, no root)",
                       epilog=LS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="DEVICE")
    p.add_argument("backup", metavar="ID", help="a backup id, or 'latest'")
    p.add_argument("path", metavar="PATH", nargs="?", default="", help="a volume and a path in it, e.g. p2/etc")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="everything below PATH")
    p.add_argument("--json", action="store_true", help="one JSON document")
    add_endpoint_option(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("dump", help="write a file inside a backup to stdout (a directory as tar)",
                       epilog=DUMP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="DEVICE")
    p.add_argument("backup", metavar="ID", help="a backup id, or 'latest'")
    p.add_argument("path", metavar="PATH", help="a volume and a path in it, e.g. p2/etc/fstab")
    add_endpoint_option(p)
    p.set_defaults(func=cmd_dump)


def note(message: str) -> None:
    """Something left out or not kept: said on stderr, not an error."""
    print(f"backupfs: note: {one_line(message)}", file=sys.stderr)


@contextmanager
def backup_files(repo_path: str, device: str, ident: str,
                 endpoint: str | None = None) -> Iterator[tuple[GuestDisk, str]]:
    """The guest's volumes in backup ``ident`` of ``device``, and its id.

    Read with the repository opened read-only (locked: a prune cannot merge
    the images under us). A mounted repository is the daemon's: the same
    files are under the mount, and the message says where.
    """
    from engine.repo import Repository

    if repo_path.startswith("s3://"):  # a remote: its lineage downloaded, checked (backupfs/cli_remote.py)
        with remote_backup_files(repo_path, endpoint, device, ident) as found:
            yield found
        return
    if endpoint is not None:
        raise UsageError("--endpoint goes with an s3:// URL")
    path = os.path.abspath(repo_path)
    record = read_mount_record(path)
    if record is not None:
        where = os.path.join(record.mountpoint, device, "files", ident)
        raise UsageError(f"repository {escape(path)} is mounted at {escape(record.mountpoint)}: "
                         f"the files are under {escape(where)}/ (or run 'backupfs umount "
                         f"{escape(record.mountpoint)}' to use this command)")
    with Repository.open(path, writable=False) as repo:
        rec = repo.resolve_backup(device, ident)
        with repo.open_files(rec.id) as disk:
            yield disk, rec.id


def cmd_ls(args: argparse.Namespace) -> int:
    from backupfs.guestwalk import find, split_path

    out = sys.stdout
    with backup_files(args.repo, args.name, args.backup, args.endpoint) as (disk, _):
        volume_name, _below = split_path(args.path)
        if not volume_name:
            from backupfs.guestls import volume_json, volume_line

            if args.json:
                json.dump([volume_json(i) for i in disk.infos()], out, indent=1)
                out.write("\n")
            else:
                for info in disk.infos():
                    out.write(volume_line(info, args.long) + "\n")
            return 0
        target = find(disk, args.path)
        if args.json:
            _write_json_list(_json_entries(target, args.recursive))
        else:
            for line in _text_lines(target, args.long, args.recursive):
                out.write(line + "\n")
    return 0


def _listed(target: Target, recursive: bool) -> Iterator[tuple[bytes, Target]]:
    """What `ls` shows for a target: itself when not a directory; else its
    entries (all below it with -R), each with the name to show."""
    from backupfs.guestwalk import Target, walk

    volume = target.volume
    if not target.entry.is_dir:
        yield (target.path[-1] if target.path else volume.name.encode()), target
        return
    if recursive:
        for rel, entry in walk(volume, target.path, target.entry):
            if rel:
                yield b"/".join(rel), Target(volume, target.path + rel, entry)
        return
    for name, entry in sorted(volume.listing(target.path).items()):
        yield name, Target(volume, target.path + (name,), entry)


def _link_target(item: Target) -> bytes | None:
    return item.volume.readlink(item.path) if item.entry.is_link else None


def _text_lines(target: Target, long: bool, recursive: bool) -> Iterator[str]:
    from backupfs.guestls import entry_line

    for name, item in _listed(target, recursive):
        yield entry_line(name, item.entry, long, _link_target(item) if long else None)


def _json_entries(target: Target, recursive: bool) -> Iterator[dict[str, Any]]:
    from backupfs.guestls import entry_json

    for _, item in _listed(target, recursive):
        name = item.path[-1] if item.path else item.volume.name.encode()
        path = b"/".join((item.volume.name.encode(),) + item.path)
        yield entry_json(name, path, item.entry, _link_target(item))


def _write_json_list(items: Iterator[dict[str, Any]]) -> None:
    """A JSON list written an item at a time: a tree of a million files
    costs one entry's memory, not the document's."""
    out = sys.stdout
    out.write("[")
    for n, item in enumerate(items):
        out.write(",\n " if n else "\n ")
        out.write(json.dumps(item))
    out.write("\n]\n")


def _reader_left() -> int:
    """The reader of stdout went away (`| head`): stop quietly, exit as a
    tool killed by SIGPIPE does (141), and let Python's exit flush nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 141


def cmd_dump(args: argparse.Namespace) -> int:
    from backupfs.guestdump import write_file, write_tar
    from backupfs.guestwalk import find, kind_of

    if sys.stdout.isatty():
        raise UsageError("refusing to write a backup's file to a terminal; redirect stdout to a file or a pipe")
    with backup_files(args.repo, args.name, args.backup, args.endpoint) as (disk, _):
        target = find(disk, args.path)
        entry = target.entry
        if not (entry.is_file or entry.is_dir):
            raise UsageError(f"{target.shown} is a {kind_of(entry.mode)}: dump takes a regular file or a directory")
        sys.stdout.flush()
        try:
            if entry.is_file:
                write_file(target.volume, target.path, sys.stdout.fileno())
            else:
                write_tar(target, sys.stdout.buffer, note)
                sys.stdout.buffer.flush()
        except BrokenPipeError:
            return _reader_left()
    return 0


def cmd_restore_files(args: argparse.Namespace) -> int:
    """`restore REPO DEVICE ID DIR --include PATH...`: files and trees into DIR."""
    from backupfs.guestrestore import Restorer, open_target_dir
    from backupfs.guestwalk import find

    _refuse_dir_in_repository(args.target, args.repo)
    root_fd = open_target_dir(args.target)  # before the backup is read: a wrong DIR fails at once
    try:
        with backup_files(args.repo, args.name, args.backup, args.endpoint) as (disk, backup_id):
            targets = _outermost([find(disk, path) for path in args.include])
            volumes = sorted({t.volume.name for t in targets})
            if len(volumes) > 1:
                raise UsageError(f"--include paths from several volumes ({', '.join(map(escape, volumes))}): "
                                 "the path below the volume is kept, so restore each volume into its own "
                                 "directory, one run each")
            restorer = Restorer(root_fd, args.target, args.force, note,
                                keep_special=getattr(args, "keep_special", False))
            for target in targets:
                restorer.restore(target)
            restorer.finish()
    finally:
        os.close(root_fd)
    counts = restorer.counts
    print(one_line(f"restored {counts.summary()} from {escape(volumes[0])} of backup "
                   f"{escape(backup_id)} into {escape(args.target)}"))
    if counts.unreadable:
        what = "1 entry" if counts.unreadable == 1 else f"{counts.unreadable} entries"
        raise BackupfsError(f"{what} could not be read from the backup (named above); everything else was restored")
    if counts.unwritable:
        what = "1 entry" if counts.unwritable == 1 else f"{counts.unwritable} entries"
        raise BackupfsError(f"{what} had a name too long for {escape(args.target)} (named above); "
                            "everything else was restored")
    return 0


def _outermost(targets: list[Target]) -> list[Target]:
    """The includes without those inside another one (``p2/etc`` and
    ``p2/etc/fstab``: the tree holds the file, which would otherwise be
    restored twice and refused the second time as existing)."""
    kept: list[Target] = []
    for target in sorted(targets, key=lambda t: (t.volume.name, len(t.path))):
        if not any(k.volume.name == target.volume.name and target.path[:len(k.path)] == k.path for k in kept):
            kept.append(target)
    return kept


def _refuse_dir_in_repository(target: str, repo: str) -> None:
    """The repository holds only what backupfs records there: files restored
    into it would sit among the images, private to root, and confuse both."""
    where, repository = os.path.realpath(target), os.path.realpath(repo)
    if where == repository or where.startswith(repository.rstrip("/") + "/"):
        raise UsageError(f"{escape(target)} is inside the repository {escape(repo)}; restore files elsewhere")
