"""`backupfs mount | umount`: start and stop the filesystem daemon."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import TextIO

from backupfs.cli_common import default_stop_signals, tell_notices
from backupfs.mountaccess import describe_options
from backupfs.mountinfo import check_mountpoint, find_mount, listed_mounts, parse_options, read_mount_record, wait_for_exit
from backupfs.mountstatus import STATUS_XATTR, progress_text, read_status
from engine.errors import BackupfsError, UsageError
from engine.text import escape, one_line

LOG_FILE = "backupfs.log"
UMOUNT_TIMEOUT = 600.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount a repository (returns once the mount is ready); "
                                     "with no arguments, list the mounts and their options")
    p.add_argument("repo", metavar="REPO", nargs="?")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("-o", dest="options", metavar="OPTIONS",
                   help="mount options, e.g. allow_other, allow_group=GROUP, gid=GROUP,umask=027, files_owner_only; "
                        "of an s3:// remote: cache=DIR, cache_size=10G, files_owner_only")
    p.add_argument("--endpoint", metavar="URL",
                   help="with an s3:// URL: the S3 endpoint (default: $AWS_ENDPOINT_URL, then AWS's own)")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount; waits until the daemon has saved its bitmaps")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)


class OneLineFormatter(logging.Formatter):
    """Log records one line each: a file name or label in a message cannot
    forge a line of the log or send escape sequences to whoever tails it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802, ANN001 - logging's name and type
        # A traceback keeps its lines; what each line says is escaped.
        return "\n".join(one_line(line) for line in super().formatException(ei).split("\n"))


# Libraries whose tracebacks tell of what an endpoint answered, not of a fault
# of ours: urllib3 logs one with its warning about headers a server cut short.
NETWORK_LOGGERS = frozenset(("urllib3", "botocore", "boto3", "s3transfer"))


class NetworkLibraryLines(logging.Filter):
    """A network library's record as one line, the exception named after its
    message, no traceback: a broken or hostile endpoint (a remote mount's) would
    otherwise fill the daemon's log with them, and hide ours among them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".")[0] in NETWORK_LOGGERS:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__})" if exc is not None else record.getMessage()
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def _logging_to(stream_or_path: object) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    root.handlers.clear()
    if isinstance(stream_or_path, str):
        handler: logging.Handler = logging.StreamHandler(_open_log(stream_or_path))
    else:
        handler = logging.StreamHandler(stream_or_path)  # type: ignore[arg-type]
    handler.setFormatter(OneLineFormatter(fmt))
    handler.addFilter(NetworkLibraryLines())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _open_log(path: str) -> TextIO:
    """The daemon's log, appended to; created with the repository's file
    mode (0600, or 0640 when shared with a group), whatever the umask."""
    from engine.access import set_new_file_mode

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            set_new_file_mode(fd, path)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def cmd_mount(args: argparse.Namespace) -> int:
    from backupfs.mount import serve  # pyfuse3 and trio: only the daemon needs them

    if args.repo is None:
        if args.options or args.foreground:
            raise UsageError("mount: give REPO and MOUNTPOINT with -o or -f")
        return _list_mounts()
    if args.mountpoint is None:
        raise UsageError("mount: give a MOUNTPOINT after the repository (or no arguments, to list the mounts)")
    default_stop_signals()  # the daemon has its own: unmount cleanly
    from engine.remote.location import is_s3_url

    if is_s3_url(args.repo):
        return _mount_remote(args)
    if args.endpoint is not None:
        raise UsageError("--endpoint goes with an s3:// URL")
    options = parse_options(args.options)
    repo = os.path.abspath(args.repo)
    record = read_mount_record(repo)
    if record is not None:  # said here: the daemon could only say who holds the lock
        check_mountpoint(repo, args.mountpoint)  # but what is wrong with the mount point first, as it does
        raise UsageError(f"repository {repo} is in use by pid {record.pid}: it is mounted at {record.mountpoint}; "
                         f"run 'backupfs umount {record.mountpoint}' first to mount it elsewhere")
    return _start_daemon(args, lambda ready: serve(repo, args.mountpoint, options, ready),
                         os.path.join(repo, LOG_FILE) if os.path.isdir(repo) else os.devnull)


def _mount_remote(args: argparse.Namespace) -> int:
    """`mount s3://BUCKET/PREFIX MOUNT`: the remote's backups, read-only (backupfs/remotemount.py)."""
    from backupfs.remotemount import log_path, serve_remote, split_options

    options = [o.strip() for o in (args.options or "").split(",") if o.strip()]
    split_options(options)  # refused here, in the caller's terminal
    return _start_daemon(args, lambda ready: serve_remote(args.repo, args.endpoint, args.mountpoint, options, ready),
                         log_path(args.repo, args.endpoint, options))


def _start_daemon(args: argparse.Namespace, serve: Callable[[Callable[[str | None], None]], None],
                  log_file: str) -> int:
    """Run ``serve`` in the foreground (-f) or as a detached daemon logging to ``log_file``;
    return once it says it serves, or fail with what it said."""
    from engine.access import notices

    if args.foreground:
        _logging_to(sys.stderr)
        notices.propagate = False  # on stderr already: once is enough
        errors: list[str] = []
        serve(lambda msg: errors.append(msg) if msg else None)
        if errors:
            raise BackupfsError(errors[0])
        return 0

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon: detach twice, then serve
        os.close(r)
        try:
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            _detach_stdio()
            _logging_to(log_file)
            told = [False]

            def note(text: str) -> None:
                """A notice from opening the repository: the parent prints it on
                its stderr, as any command does (the log keeps it too)."""
                if not told[0]:
                    os.write(w, f"NOTE {text}\n".encode())

            tell_notices(note)

            def ready(message: str | None) -> None:
                if told[0]:
                    return
                told[0] = True
                os.write(w, b"OK\n" if message is None else f"ERR {one_line(message)}\n".encode())
                os.close(w)

            try:
                serve(ready)
            except BaseException as e:  # noqa: BLE001 - the daemon reports, then exits
                logging.getLogger("backupfs").exception("daemon failed")
                ready(f"internal error: {type(e).__name__}: {e}")
                os._exit(1)
            ready("the filesystem stopped before it was ready")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        answer = f.readline().decode(errors="replace").strip()
        while answer.startswith("NOTE "):
            print(f"backupfs: {one_line(answer[5:])}", file=sys.stderr)
            answer = f.readline().decode(errors="replace").strip()
    if answer == "OK":
        return 0
    raise BackupfsError(answer[4:] if answer.startswith("ERR ") else "the mount daemon exited without a word")


def _list_mounts() -> int:
    """One line a mount, as mount(8) lists: where, which repository, its
    daemon and the options it was mounted with (nosuid,nodev always)."""
    for point, repo, record, stranger in listed_mounts():
        if stranger is not None:  # its record is theirs to read
            print(f"{escape(repo)} on {escape(point)} (another user's mount: uid {stranger})")
            continue
        if record is None:
            print(f"{escape(repo)} on {escape(point)} (dead mount: its daemon is gone)")
            continue
        remote = ("ro",) if repo.startswith("s3://") else ()  # a remote mount is always read-only
        options = describe_options(("nosuid", "nodev") + remote + record.options)
        print(f"{escape(repo)} on {escape(point)} (daemon pid {record.pid}; {escape(options)})")
    return 0


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def cmd_umount(args: argparse.Namespace) -> int:
    mp = os.path.normpath(os.path.abspath(args.mountpoint))
    found = find_mount(mp)
    if found is None:
        mp = os.path.realpath(args.mountpoint)  # given through a symlink?
        found = find_mount(mp)
    if found is None:
        raise UsageError(f"{args.mountpoint} is not a backupfs mount")
    repo = found[0]
    if repo.startswith("s3://"):
        return _umount_remote(args.mountpoint, mp)
    record = read_mount_record(repo)
    # Its daemon already gone (kill -9; a zombie not yet reaped still has
    # a record): a pidfd is readable at once for a process that has exited.
    dead = record is None or wait_for_exit(record.pid, 0)
    proc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"
        raise BackupfsError(f"cannot unmount {args.mountpoint}: {reason}{_running_jobs(mp)}")
    if record is not None and not wait_for_exit(record.pid, UMOUNT_TIMEOUT):
        raise BackupfsError(
            f"unmounted {args.mountpoint}, but daemon pid {record.pid} has not exited after "
            f"{UMOUNT_TIMEOUT:.0f} s; its bitmaps may not be saved yet"
        )
    from engine.beside import bitmaps_left_in_use

    unsaved = bitmaps_left_in_use(repo)
    if unsaved and dead:
        # A dead mount (kill -9): clearing it is all that was asked, and an
        # unclean stop is what it was; say what that means, exit 0.
        print(one_line(f"backupfs: {args.mountpoint} was a dead mount; its daemon did not save the bitmaps of "
                       f"{', '.join(unsaved)}, so their next backups will scan"), file=sys.stderr)
    elif unsaved:
        raise BackupfsError(
            f"unmounted {args.mountpoint}, but the bitmaps of {', '.join(unsaved)} are not saved as "
            f"clean (see {os.path.join(repo, LOG_FILE)}); their next backups will scan"
        )
    return 0


def _umount_remote(given: str, mp: str) -> int:
    """A remote mount: unmount, then wait for its daemon (it saves its cache's records
    and lets the cache go, so a mount of the same cache right after finds it free)."""
    from backupfs.mountinfo import remote_daemon

    pid = remote_daemon(mp)
    proc = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "fusermount3 failed"
        raise BackupfsError(f"cannot unmount {given}: {reason}")
    if pid is not None and not wait_for_exit(pid, UMOUNT_TIMEOUT):
        raise BackupfsError(f"unmounted {given}, but daemon pid {pid} has not exited after {UMOUNT_TIMEOUT:.0f} s")
    return 0


def _running_jobs(mountpoint: str) -> str:
    """Why a mount may be busy: the jobs running in it, and who waits for each."""
    found = []
    try:
        names = sorted(os.listdir(mountpoint))
    except OSError:
        return ""
    for name in names:
        try:
            fields = read_status(os.path.join(mountpoint, name, "snapshot"))
        except (OSError, BackupfsError):
            continue
        if fields["state"] == "running":
            who = fields["requester"]
            found.append(f"{name}: {(fields['command'].split() or ['?'])[0]} "
                         f"{progress_text(fields, 'running')}" + (f", requested by {who}" if who else ""))
    found += _running_control(mountpoint)
    if not found:
        return ""
    return ("; jobs are running (" + "; ".join(found) + "): wait for them, or stop whoever requested "
            "them to cancel them")


def _running_control(mountpoint: str) -> list[str]:
    """A device add, remove or import running through MOUNT/.control (backupfs/repocontrol.py)."""
    import json

    from backupfs.control import CONTROL_NAME

    try:
        fields = json.loads(os.getxattr(os.path.join(mountpoint, CONTROL_NAME), STATUS_XATTR))
    except (OSError, ValueError):
        return []
    if not isinstance(fields, dict) or fields.get("state") != "running":
        return []
    who = fields.get("requester")
    return [f"{fields.get('command', '?')} ({fields.get('progress') or 'starting'})"
            + (f", requested by {who}" if who else "")]
