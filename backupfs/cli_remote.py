"""`backupfs remote add|list|remove` and `backupfs push`: off-site copies on S3.

A remote is recorded in the repository's catalog (name, s3:// URL,
endpoint, region; never credentials, which boto3 takes from the
environment, profiles and config files). The catalog may be held by a
mount's daemon: a remote is then recorded beside it, through SQLite's own
locking (the daemon never reads or writes the remotes table), and a push
reads the repository beside it (engine/remote/localread.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from backupfs.cli_common import catalog_for_reading, progress_reporter
from backupfs.cli_output import on_terminal, print_json, print_table
from backupfs.mountinfo import read_mount_record
from engine.errors import BackupfsError, UsageError
from engine.text import escape

if TYPE_CHECKING:
    from engine.catalog import Catalog
    from engine.remote.remotecatalog import RemoteCatalog
    from engine.remote.store import RemoteStore


def register(sub: argparse._SubParsersAction) -> None:
    rem = sub.add_parser("remote", help="record, list or forget off-site copies on S3-compatible storage")
    rsub = rem.add_subparsers(dest="remote_command", metavar="ACTION")
    rsub.required = True
    p = rsub.add_parser("add", help="record a remote: s3://BUCKET/PREFIX (credentials: AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws; never stored)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("url", metavar="URL", help="s3://BUCKET/PREFIX")
    p.add_argument("--endpoint", metavar="URL",
                   help="the S3 endpoint (default: $AWS_ENDPOINT_URL when the command runs, then AWS's own)")
    p.add_argument("--region", metavar="R", help="the bucket's region (default: the profile's, then us-east-1)")
    p.set_defaults(func=cmd_remote_add)
    p = rsub.add_parser("list", help="the recorded remotes")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, url, endpoint, region}")
    p.set_defaults(func=cmd_remote_list)
    p = rsub.add_parser("remove", help="forget a remote (what it holds stays in the bucket)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_remote_remove)

    p = sub.add_parser("push", help="upload to a remote what it lacks, each chain in order, then its catalog")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("name", metavar="NAME", help="the remote (remote add)")
    p.add_argument("devices", metavar="DEVICE", nargs="*",
                   help="only these devices (default: all; the remote then mirrors the repository)")
    p.set_defaults(func=cmd_push)


@contextmanager
def _catalog_for_writing(repo: str) -> Iterator[Catalog]:
    """The catalog to record a remote in: locked, or beside the mount's daemon (or a
    running command) that holds the repository."""
    from engine.catalog import Catalog
    from engine.layout import CATALOG
    from engine.repo import Repository

    path = os.path.abspath(repo)
    if read_mount_record(path) is None:
        try:
            opened = Repository.open(path)
        except BackupfsError as e:
            if getattr(e, "errno", None) != errno.EBUSY:
                raise
        else:
            with opened:
                yield opened.catalog
            return
    catalog = Catalog.open(os.path.join(path, CATALOG))
    try:
        yield catalog
    finally:
        catalog.close()


def cmd_remote_add(args: argparse.Namespace) -> int:
    from engine.remote.location import make_spec

    spec = make_spec(args.name, args.url, args.endpoint, args.region)
    with _catalog_for_writing(args.repo) as catalog:
        catalog.add_remote(spec)
    where = f" at {escape(spec.endpoint)}" if spec.endpoint else ""
    print(f"remote {spec.name}: {escape(spec.url)}{where}")
    return 0


def cmd_remote_list(args: argparse.Namespace) -> int:
    with catalog_for_reading(args.repo) as catalog:
        remotes = catalog.remotes()
    if args.json:
        print_json([{"name": r.name, "url": r.url, "endpoint": r.endpoint, "region": r.region} for r in remotes])
        return 0
    tty = on_terminal()
    print_table(("NAME", "URL", "ENDPOINT", "REGION"),
                [[escape(r.name), escape(r.url), escape(r.endpoint or "-"), escape(r.region or "-")] for r in remotes],
                tty=tty, header_when_piped=False)
    return 0


def cmd_remote_remove(args: argparse.Namespace) -> int:
    with _catalog_for_writing(args.repo) as catalog:
        if not catalog.remove_remote(args.name):
            raise UsageError(f"no remote named {args.name!r}")
    print(f"removed remote {escape(args.name)} (what it holds stays in its bucket)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from engine.repo import Repository

    with progress_reporter(sys.stderr.isatty(), f"push {args.name}") as progress:
        result = Repository.push(args.repo, args.name, args.devices or None, progress)
    print(result.summary(escape(args.name)))
    return 0


def add_endpoint_option(p: argparse.ArgumentParser) -> None:
    """--endpoint, on every command that takes an s3:// URL."""
    p.add_argument("--endpoint", metavar="URL",
                   help="with an s3:// URL: the S3 endpoint (default: $AWS_ENDPOINT_URL, then AWS's own)")


@contextmanager
def catalog_or_remote(repo: str, endpoint: str | None = None) -> Iterator[Catalog | RemoteCatalog]:
    """What a reading command reads: a remote's catalog (s3://BUCKET/PREFIX, or a
    directory a remote's prefix was copied to), else the repository's."""
    from engine.remote.location import is_s3_url, parse_s3_url, validate_endpoint
    from engine.remote.remotecatalog import is_copied_remote, read_dir_catalog, read_store_catalog
    from engine.remote.store import RemoteStore

    if is_s3_url(repo):
        location = parse_s3_url(repo)
        store = RemoteStore(f"remote {location.url}", location, validate_endpoint(endpoint))
        yield read_store_catalog(store)[0]
        return
    if endpoint is not None:
        raise UsageError("--endpoint goes with an s3:// URL")
    if is_copied_remote(repo):
        yield read_dir_catalog(repo)
        return
    with catalog_for_reading(repo) as catalog:
        yield catalog


def _remote_store(url: str, endpoint: str | None) -> tuple[RemoteStore, RemoteCatalog]:
    from engine.remote.location import parse_s3_url, validate_endpoint
    from engine.remote.remotecatalog import read_store_catalog
    from engine.remote.store import RemoteStore

    location = parse_s3_url(url)
    store = RemoteStore(f"remote {location.url}", location, validate_endpoint(endpoint))
    return store, read_store_catalog(store)[0]


def restore_from_remote(args: argparse.Namespace) -> int:
    """`backupfs restore s3://BUCKET/PREFIX NAME ID TARGET`: the whole disk
    (with --include, files: backupfs/cli_files.py, which the caller sends it to)."""
    from engine.remote.remoteops import restore_remote
    from engine.text import one_line

    store, catalog = _remote_store(args.repo, args.endpoint)
    with progress_reporter(sys.stderr.isatty(), f"restore {args.name}") as update:
        result = restore_remote(store, catalog, args.name, args.backup, args.target, force=args.force,
                                on_progress=update)
    print(one_line(result.summary(args.name, f" from {args.repo}")))
    return 0


def verify_remote_cmd(args: argparse.Namespace) -> int:
    """`backupfs verify s3://BUCKET/PREFIX [NAME] [--backup ID]`: every object read back."""
    from engine.job import Progress
    from engine.remote.remoteops import verify_remote

    store, catalog = _remote_store(args.repo, args.endpoint)
    chosen = catalog.backups(args.name) if args.name is None or catalog.device(args.name) else []
    total = 0
    for b in chosen:
        entry = catalog.entry(b.id)
        total += entry.image.size + (entry.checksums.size if entry and entry.checksums else 0) if entry else 0
    with progress_reporter(sys.stderr.isatty() and total > 0, "verify") as update:
        progress = Progress(total=total, phase="reading back")

        def on_bytes(n: int) -> None:
            progress.done += n
            if update is not None:
                update(progress)

        report = verify_remote(store, catalog, args.name, args.backup, on_bytes)
    if args.json:
        print_json(report.data())
    else:
        for backup, problem, _inherited in report.problems:
            print(f"bad: {escape(backup)}: {escape(problem)}")
        print(f"{escape(args.repo)}: {len(report.checked)} backups, {report.objects} objects read back "
              f"({report.bytes_read} bytes): " + ("all good" if report.ok else f"{len(report.bad)} damaged"))
        for line in report.advice():
            print(line)
    return 0 if report.ok else 1


@contextmanager
def remote_backup_files(url: str, endpoint: str | None, device: str, ident: str) -> Iterator[tuple[Any, str]]:
    """The guest's volumes in a remote backup (for `ls`, `dump`, `restore --include`):
    its lineage downloaded into a private temporary directory, each object checked
    against the catalog, removed when done."""
    import shutil
    import tempfile

    from engine.guest.guestdisk import GuestDisk
    from engine.remote.fetch import fetch_chain
    from engine.remote.remoteops import resolve

    store, catalog = _remote_store(url, endpoint)
    rec = resolve(catalog, device, ident)
    work = tempfile.mkdtemp(prefix="backupfs-remote-")
    try:
        view = fetch_chain(store, catalog, rec.id, work)
        disk = GuestDisk(view, on_close=view.close, name=rec.id)
        try:
            yield disk, rec.id
        finally:
            disk.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
