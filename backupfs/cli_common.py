"""What the command modules share: signals, progress, notices, the catalog for reading.

cli.py and the command modules (cli_repo, cli_ops, cli_mount, cli_image)
import this; it imports none of them, so the CLI's modules import one way.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from engine.access import notices
from engine.errors import BackupfsError
from engine.stopsignals import no_stops_in_new_threads

from backupfs.mountinfo import read_mount_record

if TYPE_CHECKING:
    from engine.catalog import Catalog
    from engine.job import Progress

# The engine (numpy and all) is imported by the functions that use it, so
# that `backupfs image ...` and --help start fast.


class NoticeHandler(logging.Handler):
    """Hands each of the engine's notices (e.g. that a repository readable by
    others was made private) to ``say``: one line, told once, not an error."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage().replace("\n", "\\n"))


def tell_notices(say: Callable[[str], None]) -> None:
    """Send the engine's notices to ``say`` (replacing where they went)."""
    for handler in list(notices.handlers):
        notices.removeHandler(handler)
    notices.addHandler(NoticeHandler(say))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: cleaned up like Ctrl-C (temporary images and
    restore files removed, the job recorded as cancelled)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def stop_cleanly_on_signals() -> None:
    """Let `kill` and a closed terminal clean up as Ctrl-C does.

    Left alone when ignored (nohup). A command that hands its work to the
    mount's daemon puts them back to the default first: the daemon cancels
    the job when a signal will kill the process waiting for it
    (backupfs/requester.py), not when the process catches it.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _stop)


def default_stop_signals() -> None:
    """Signals back to the default, before handing work to the mount's daemon
    (see stop_cleanly_on_signals)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is _stop:
            signal.signal(sig, signal.SIG_DFL)


@contextmanager
def progress_reporter(enabled: bool, label: str) -> Iterator[Callable[[Progress], None] | None]:
    """A tqdm bar on a terminal; nothing at all in scripts."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    # A terminal that reports no size (a fresh pty) makes tqdm draw nothing;
    # shutil falls back to 80x24 there.
    size = shutil.get_terminal_size()
    # tqdm starts its monitor thread with the first bar: started without
    # the stop signals, a Ctrl-C cannot land in it (engine/stopsignals.py).
    with no_stops_in_new_threads():
        bar = tqdm(
            total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
            leave=False, ncols=size.columns, nrows=size.lines,
        )
    last = [0.0]

    def update(p: Progress) -> None:
        now = time.monotonic()
        if last[0] and now - last[0] < 0.1 and p.done < p.total:
            return
        last[0] = now
        bar.total = p.total
        bar.n = p.done
        bar.set_description(f"{label} ({p.phase})", refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def close_quietly(fd: int) -> None:
    """Close a trigger file: on a mount that went away, close says ENOTCONN,
    which would hide what the write itself said."""
    try:
        os.close(fd)
    except OSError:
        pass


@contextmanager
def catalog_for_reading(repo_path: str) -> Iterator[Catalog]:
    """The catalog, read beside a mount that owns the repository, or locked if not mounted."""
    from engine.beside import read_catalog
    from engine.repo import Repository

    path = os.path.abspath(repo_path)
    repo = None
    if read_mount_record(path) is None:
        try:
            repo = Repository.open(path, writable=False)  # reading deletes nothing
        except BackupfsError as e:
            if getattr(e, "errno", None) != errno.EBUSY:
                raise
            # Another command holds it (an unmounted backup, a prune):
            # read beside it, as beside a mount.
    if repo is not None:
        with repo:
            yield repo.catalog
        return
    catalog = read_catalog(path)
    try:
        yield catalog
    finally:
        catalog.close()
