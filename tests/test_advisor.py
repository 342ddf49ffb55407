"""The read-ahead advisor thread (engine/advisor.py): off the caller's thread,
in order, bounded, and every request's release runs exactly once."""

from __future__ import annotations

import threading

import pytest

from engine.advisor import Advisor


def _held(advisor: Advisor) -> tuple[threading.Event, threading.Event]:
    """Occupy the advisor's thread until the returned gate is set."""
    running, gate = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        gate.wait(30)

    advisor.submit(hold)
    assert running.wait(30)
    return running, gate


def test_advice_runs_in_order_on_its_own_thread_then_its_release() -> None:
    advisor = Advisor(max_pending=8)
    events: list[tuple[str, int, str]] = []
    caller = threading.current_thread().name
    try:
        _running, gate = _held(advisor)
        for k in range(5):
            assert advisor.submit(
                lambda k=k: events.append(("advise", k, threading.current_thread().name)),
                lambda k=k: events.append(("release", k, threading.current_thread().name)),
            )
        last = threading.Event()
        assert advisor.submit(last.set)
        gate.set()
        assert last.wait(30)
    finally:
        advisor.close()
    assert [(what, k) for what, k, _ in events] == [
        (what, k) for k in range(5) for what in ("advise", "release")
    ], "a pending request was dropped by close, or ran out of order"
    assert all(thread != caller for _, _, thread in events)
    assert advisor.done_count >= 6 and advisor.dropped_count == 0


def test_a_full_queue_drops_new_advice_and_releases_it_at_once() -> None:
    advisor = Advisor(max_pending=2)
    released: list[int] = []
    try:
        _running, gate = _held(advisor)
        assert advisor.submit(lambda: None, lambda: released.append(1))
        assert advisor.submit(lambda: None, lambda: released.append(2))
        assert not advisor.submit(pytest.fail, lambda: released.append(3))
        assert released == [3]  # the dropped one, on the caller's thread, before returning
        gate.set()
        last = threading.Event()
        while not advisor.submit(last.set):
            pass  # the queue drains as the thread goes on
        assert last.wait(30)
    finally:
        advisor.close()
    assert sorted(released) == [1, 2, 3]


def test_failing_advice_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    advisor = Advisor()
    released: list[str] = []
    done = threading.Event()

    def bad() -> None:
        raise OSError(9, "Bad file descriptor")

    try:
        advisor.submit(bad, lambda: released.append("bad"))
        advisor.submit(done.set, lambda: released.append("good"))
        assert done.wait(30), "the thread died with the failing advice"
    finally:
        advisor.close()
    assert released == ["bad", "good"]
    assert "read-ahead advice failed" in caplog.text


def test_close_drops_what_waits_releases_it_and_refuses_more() -> None:
    advisor = Advisor()
    released: list[str] = []
    _running, gate = _held(advisor)
    advisor.submit(pytest.fail, lambda: released.append("waiting"))
    closer = threading.Thread(target=advisor.close)
    closer.start()
    gate.set()  # the running request finishes; close() waits for it, not for the queue
    closer.join(30)
    assert not closer.is_alive()
    assert released == ["waiting"]
    assert not advisor.submit(pytest.fail, lambda: released.append("late"))
    assert released == ["waiting", "late"]


def test_a_failing_release_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A release that raises (a view's close failing) must not kill the
    thread: later advice would be accepted and never run, and the views it
    holds never let go."""
    advisor = Advisor()
    done = threading.Event()

    def bad_release() -> None:
        raise KeyError("no such view")

    try:
        advisor.submit(lambda: None, bad_release)
        advisor.submit(done.set)
        assert done.wait(30), "the thread died with the failing release"
    finally:
        advisor.close()
    assert "releasing after read-ahead advice failed" in caplog.text
