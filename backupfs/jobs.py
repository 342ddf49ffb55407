"""The jobs a trigger file starts: backups, verify and prune, each in a worker thread.

A write of a trigger line to MOUNT/<device>/snapshot runs the job and
returns when it is done (and durable); the file then reads the job's
status. One job per device at a time (EBUSY otherwise); a writer that is
killed or interrupted cancels its job (backupfs/requester.py says why the
kernel cannot do that for us).
"""

from __future__ import annotations

import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import outcome
import trio

from backupfs.requester import Requester
from backupfs.status import JobStatus, utc_text
from backupfs.tree import RequestError
from backupfs.trigger import PruneCommand, TriggerCommand, TriggerError, VerifyCommand, parse_trigger
from engine.errors import BackupfsError
from engine.job import CancelRequest, Source
from engine.prune import RetentionPolicy
from engine.repo import Repository
from engine.text import one_line

log = logging.getLogger("backupfs.fs")

REQUESTER_POLL = 0.2  # seconds between looks at a waiting writer's signals
# A trigger write that reaches us this soon after a job ended, from a file
# opened before that end, was issued while the job ran: the kernel lets one
# write to a file through at a time and held it back (see _waited_behind).
QUEUED_WRITE_WINDOW = 1.0

SourceFactory = Callable[[Any], Source]  # a device -> what a backup reads it through
PruneHook = Callable[[str, set[str]], Awaitable[None]]  # (device, backup ids before the prune)


class TriggerWriter(Protocol):
    """The open trigger file a write came through (fs.py's Handle)."""

    opened: float  # time.monotonic() at its open


def _one_line(line: bytes, limit: int = 200) -> str:
    """A rejected trigger line as the status shows it: escaped onto one line,
    so that no text written to the trigger reads as a line of the status
    (a forged "state: succeeded")."""
    text = one_line(line.strip().decode("utf-8", "backslashreplace"))
    return text if len(text) <= limit else text[:limit] + "..."


def _waited_behind(status: JobStatus, handle: TriggerWriter) -> bool:
    """Was this trigger write held back by the kernel behind the last job?

    Opens during a job are refused with EBUSY, but writers that opened the
    file before it started (eight hooks firing at once) reach us one after
    another as each job ends, and each would run a job of its own. Such a
    write gets EBUSY too: the job it waited for is what ran. The writer
    whose own write ran that job is not held back by it, nor one opened
    after the job started (an open during a job is refused, so that one
    opened after it ended).

    Not told apart: a write issued just after the job ended on a file
    opened before it started (the status then says what was refused), and
    writers sharing one open file (one handle: the first exemption).
    """
    began, ended = status.began, status.ended
    return (
        began is not None
        and ended is not None
        and status.writer is not handle
        and handle.opened < began
        and time.monotonic() - ended < QUEUED_WRITE_WINDOW
    )


class JobRunner:
    """Runs trigger lines for the mount, and keeps each device's job status.

    ``source_factory`` replaces how backups read their sources (tests inject
    failing reads through it); ``on_pruned`` runs after a prune, before the
    trigger returns, to let the mount forget what is gone.
    """

    def __init__(self, repo: Repository, on_pruned: PruneHook,
                 source_factory: SourceFactory | None = None) -> None:
        self.repo = repo
        self.on_pruned = on_pruned
        self.source_factory = source_factory
        self._status: dict[str, JobStatus] = {}
        self._jobs = trio.CapacityLimiter(64)

    def status(self, device: str) -> JobStatus:
        st = self._status.get(device)
        if st is None:
            st = self._status[device] = JobStatus()
        return st

    def running(self, device: str) -> bool:
        return self.status(device).state == "running"

    def forget(self, device: str) -> None:
        """A removed device: a device added again under its name starts idle."""
        self._status.pop(device, None)

    async def trigger(self, device: str, line: bytes, requester: Requester | None = None,
                      handle: TriggerWriter | None = None) -> None:
        """Run what a trigger line asks for; return when it is done (and durable)."""
        status = self.status(device)
        try:
            cmd = parse_trigger(line)
        except TriggerError as e:
            if status.state != "running":
                last_job = status.began, status.ended  # not a job: writes held back behind it still are
                status.begin(_one_line(line))
                status.fail(str(e), errno.EINVAL, bitmap_kept=False)
                status.began, status.ended = last_job
            raise RequestError(errno.EINVAL) from None
        if status.state == "running":
            raise RequestError(errno.EBUSY)
        if handle is not None and _waited_behind(status, handle):
            status.refused.append(f"{utc_text(time.time())}: '{cmd.line()}' waited for this job and was refused "
                                  "(EBUSY); write it again to run it")
            raise RequestError(errno.EBUSY)
        status.begin(cmd.line(), requester.describe() if requester else None)
        status.writer = handle
        try:
            if isinstance(cmd, VerifyCommand):
                await self._verify(device, cmd, status, requester)
            elif isinstance(cmd, PruneCommand):
                await self._prune(device, cmd, status, requester)
            else:
                await self._backup_job(device, cmd, status, requester)
        except RequestError:
            raise
        except BackupfsError as e:
            err = e.errno or errno.EIO
            if err == errno.ECANCELED:
                # The writer was killed or interrupted: it waits for EINTR.
                # Cancelled by an unmount: ECANCELED, which no one retries.
                reason = str(e).partition(": ")[2] or "on request"
                status.cancel(reason, bitmap_kept=isinstance(cmd, TriggerCommand))
                log.info("%s of %s cancelled: %s", cmd.line(), device, status.error)
                raise RequestError(errno.EINTR if getattr(e, "interrupted", False)
                                   else errno.ECANCELED) from None
            status.fail(str(e), err, bitmap_kept=isinstance(cmd, TriggerCommand) and err != errno.EINVAL)
            log.info("%s of %s failed: %s", cmd.line(), device, e)
            raise RequestError(err) from None
        except Exception as e:
            log.exception("%s of %s failed", cmd.line(), device)
            status.fail(f"internal error: {type(e).__name__}: {e} (see the log)", errno.EIO)
            raise RequestError(errno.EIO) from None

    async def _run_job(self, fn: Callable[[CancelRequest], Any], status: JobStatus,
                       requester: Requester | None) -> Any:
        """Run ``fn(cancel)`` in a worker; cancel it if the requester is told to stop.

        The watch is what makes Ctrl-C, ``kill`` and ``timeout`` work on a
        writer that waits for its backup (backupfs/requester.py says why
        the kernel cannot do it for us).
        """
        cancel = CancelRequest()

        async def watch(requester: Requester) -> None:
            while not cancel.is_set():
                await trio.sleep(REQUESTER_POLL)
                sig = requester.stopping_signal()
                if sig is not None:
                    cancel.cancel(f"{requester.describe()} received {signal.Signals(sig).name}",
                                  interrupted=True)

        async with trio.open_nursery() as nursery:
            if requester is not None:
                nursery.start_soon(watch, requester)
            result = await trio.to_thread.run_sync(outcome.capture, fn, cancel, limiter=self._jobs)
            nursery.cancel_scope.cancel()
        return result.unwrap()

    async def _backup_job(self, device: str, cmd: TriggerCommand, status: JobStatus,
                          requester: Requester | None = None) -> None:
        def progress(p: Any) -> None:
            status.progress = p

        def run(cancel: CancelRequest) -> Any:
            return self.repo.backup(
                device, cmd.kind, cluster_size=cmd.cluster_size, scan=cmd.scan, label=cmd.label,
                auto_full=cmd.auto_full, on_progress=progress, rate=cmd.rate, cancel=cancel,
                source_factory=self.source_factory, force=cmd.force, allow_empty=cmd.empty,
                compress=cmd.compress,
            )

        result = await self._run_job(run, status, requester)
        status.succeed(result)
        log.info("%s", result.summary())

    async def _verify(self, device: str, cmd: VerifyCommand, status: JobStatus,
                      requester: Requester | None = None) -> None:
        def run(cancel: CancelRequest) -> Any:
            return self.repo.verify(device, cmd.backup, cancel=cancel)

        report = await self._run_job(run, status, requester)
        lines = [f"report: {line}" for line in report.render().splitlines()]
        status.report = report.data()  # verify --json through the mount reads it (mountstatus.py)
        if not report.ok:
            status.fail(f"verification found {len(report.problems)} problems", errno.EIO,
                        bitmap_kept=False, lines=lines)
            raise RequestError(errno.EIO)
        status.succeed(lines=lines)

    async def _prune(self, device: str, cmd: PruneCommand, status: JobStatus,
                     requester: Requester | None = None) -> None:
        policy = RetentionPolicy(cmd.keep_last, cmd.keep_daily, cmd.keep_weekly, cmd.keep_monthly)
        if cmd.dry_run:
            def preview(cancel: CancelRequest) -> Any:
                return self.repo.prune_preview(device, None if policy.empty() else policy, cmd.remove)

            status.succeed(lines=(await self._run_job(preview, status, requester)).lines())
            return

        def progress(p: Any) -> None:
            status.progress = p

        def run(cancel: CancelRequest) -> Any:
            return self.repo.prune(device, None if policy.empty() else policy, cmd.remove,
                                   cancel=cancel, on_progress=progress)

        before = {b.id for b in self.repo.backups(device)}
        try:
            plans = await self._run_job(run, status, requester)
        finally:
            await self.on_pruned(device, before)  # also when cancelled part way: some may be gone
        status.succeed(lines=[f"removed: {p.describe()}" for p in plans] or ["removed: nothing"])
