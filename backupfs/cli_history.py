"""`backupfs diff`: what changed between two backups of a device, without a mount.

Thin over engine/history/ (``Repository.history()``): the same lines as the
mount's ``changes/<id>`` files, between any two backups, or the disk's
changed byte ranges. Like `backupfs ls` it reads an unmounted repository
opened read-only; a mounted one is the daemon's, and the message says
where its ``changes/`` files are.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from engine.errors import UsageError
from engine.text import escape

from backupfs.mountinfo import read_mount_record

if TYPE_CHECKING:
    from engine.history.compare import Change

DIFF_EPILOG = """\
OLD and NEW are backup ids of DEVICE, or 'latest'; OLD must be the older
(any kinds, any distance apart, across a prune's merges).
Each line: OP<TAB>volume/path, OP one of A (added), D (deleted), M (content
changed), m (metadata only: mode, owner, times, xattrs). A directory whose
entries changed is an m line. Names are escaped (\\xNN, \\t, \\n).
--json: a list of {op, volume, path}, path from the volume's name
(p2/etc/fstab), with path_b64 (the exact bytes) when it is not UTF-8.
--blocks: the byte ranges of the disk where the two backups may differ,
found from the images' own tables (no data read): one 'START END' line each,
decimal, END exclusive; with --json a list of {start, end}.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="what changed between two backups of a device (no mount, no root)",
                       epilog=DIFF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="DEVICE")
    p.add_argument("old", metavar="OLD", help="the older backup: an id, or 'latest'")
    p.add_argument("new", metavar="NEW", help="the newer backup: an id, or 'latest'")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--blocks", action="store_true", help="the changed byte ranges of the disk instead")
    p.set_defaults(func=cmd_diff)


def change_json(c: Change) -> dict[str, Any]:
    """One change for ``--json``: the path from the volume's name, exact or escaped with its bytes."""
    raw = c.volume.encode() + b"/" + c.path
    out: dict[str, Any] = {"op": c.op, "volume": c.volume}
    try:
        out["path"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        out["path"] = escape(raw.decode("utf-8", "surrogateescape"))
        out["path_b64"] = base64.b64encode(raw).decode("ascii")
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    from engine.history.changes import render
    from engine.repo import Repository

    path = os.path.abspath(args.repo)
    record = read_mount_record(path)
    if record is not None:
        where = os.path.join(record.mountpoint, args.name, "changes")
        raise UsageError(f"repository {escape(path)} is mounted at {escape(record.mountpoint)}: what "
                         f"each backup changed is under {escape(where)}/ (or run 'backupfs umount "
                         f"{escape(record.mountpoint)}' to use this command)")
    with Repository.open(path, writable=False) as repo:
        old = repo.resolve_backup(args.name, args.old)
        new = repo.resolve_backup(args.name, args.new)
        if old.id == new.id:
            raise UsageError(f"OLD and NEW are the same backup ({escape(old.id)}): nothing to compare")
        if (old.created_ns, old.id) > (new.created_ns, new.id):
            raise UsageError(f"{escape(old.id)} is newer than {escape(new.id)}: give the older backup first "
                             f"(backupfs diff REPO DEVICE {escape(new.id)} {escape(old.id)})")
        history = repo.history()
        out = sys.stdout
        if args.blocks:
            ranges = history.blocks(old, new)
            if args.json:
                json.dump([{"start": s, "end": e} for s, e in ranges], out, indent=1)
                out.write("\n")
            else:
                out.writelines(f"{s} {e}\n" for s, e in ranges)
            return 0
        changes = history.diff(old, new)
        if args.json:
            json.dump([change_json(c) for c in changes], out, indent=1)
            out.write("\n")
        else:
            out.flush()
            sys.stdout.buffer.write(render(changes))
            sys.stdout.buffer.flush()
    return 0
