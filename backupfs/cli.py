"""The `backupfs` command: argument parsing and the one place errors are printed.

Every subcommand is a function ``(args) -> exit code``. Errors the engine
raises on purpose become one line on stderr and exit 1; anything unexpected
becomes one line too (the traceback only with BACKUPFS_DEBUG=1), because a
backup tool that answers a typo with forty lines of Python is not trusted.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import signal
import sys
from collections.abc import Sequence

from engine.errors import BackupfsError
from engine.text import one_line

from backupfs import cli_files, cli_history, cli_image, cli_mount, cli_ops, cli_remote, cli_repo
from backupfs.cli_common import Stopped, stop_cleanly_on_signals, tell_notices
from backupfs.cli_help import describe_positionals

PROG = "backupfs"


def _version() -> str:
    """The installed package's version (pyproject.toml), or 'unknown' from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("backupfs")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, whose version is looked up only when asked for: the
    lookup (importlib.metadata) cost every command 15 ms of its start, a
    seventh of `backupfs backup`'s on an RBD incremental of 10 MiB."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show program's version number and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{PROG} {_version()}")  # on stdout, as argparse's own version action does
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Incremental backup chains of block devices, shown as files.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cli_repo.register(sub)
    cli_mount.register(sub)
    cli_ops.register(sub)
    cli_image.register(sub)
    cli_files.register(sub)
    cli_history.register(sub)
    cli_remote.register(sub)
    describe_positionals(parser)
    return parser


def _raise_fd_limit() -> None:
    """Deep chains keep one descriptor per image open; allow as many as we may."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _say(message: str) -> None:
    """One line on stderr, whatever names and paths the message carries."""
    print(f"{PROG}: {one_line(message)}", file=sys.stderr)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _command_name(args: argparse.Namespace) -> str:
    """``backupfs image info``: the subcommand words, for a message that names the operation."""
    words = [PROG, getattr(args, "command", None)]
    for key, value in vars(args).items():
        if key.endswith("_command") and isinstance(value, str):
            words.append(value)
    return " ".join(w for w in words if w)


def main(argv: Sequence[str] | None = None) -> int:
    # Started with `2>&-` or `>&-`, Python has no stream there at all.
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # errors still set the exit status
    if sys.stdout is None:
        _say("error: standard output is closed; give it a file (e.g. > /dev/null)")
        return 1
    # The repository holds whole disks: nothing this process creates is for
    # other users (the engine sets each repository file's mode as well).
    os.umask(0o077)
    tell_notices(_say)
    parser = build_parser()
    args = parser.parse_args(argv)
    _raise_fd_limit()
    stop_cleanly_on_signals()
    try:
        return int(args.func(args) or 0)
    except BackupfsError as e:
        _say(f"error: {e}")
        return 1
    except Stopped as e:
        _say(f"stopped by {signal.Signals(e.signum).name}")
        return 128 + e.signum
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # `backupfs image cat ... | head`: the reader left; not an error of ours.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _say(f"error: {where}{e.strerror or errno.errorcode.get(e.errno or 0, str(e))}")
        return 1
    except UnicodeEncodeError:
        # A name, id or path that is not UTF-8 reached the catalog or a message.
        bad = [a for a in (argv if argv is not None else sys.argv[1:]) if not _is_utf8(a)]
        _say(f"error: {bad[0]!r} is not valid UTF-8 text; backupfs keeps names, ids and paths as UTF-8"
             if bad else "error: text that is not valid UTF-8 cannot be stored or shown")
        return 1
    except MemoryError:
        # The last resort: what an image, a file or an option makes us
        # allocate is refused before it is; reaching here is a bug to report.
        _say(f"error: out of memory while running '{_command_name(args)}' "
             "(set BACKUPFS_DEBUG=1 for details)")
        if os.environ.get("BACKUPFS_DEBUG"):
            raise
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if os.environ.get("BACKUPFS_DEBUG"):
            raise
        _say(f"internal error: {type(e).__name__}: {e} (set BACKUPFS_DEBUG=1 for details)")
        return 70


if __name__ == "__main__":
    sys.exit(main())
