"""When device writes run on the event loop: fast ones inline, slow ones
send the next to threads, and repeated slowness backs off."""

from __future__ import annotations

from backupfs.writepolicy import HOLD, INLINE_MAX, MAX_HOLD, SLOW, InlineWrites


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fast_writes_stay_inline_and_big_ones_do_not() -> None:
    p = InlineWrites(clock=Clock())
    for _ in range(100):
        assert p.allowed(4096)
        p.record(SLOW / 10, inline=True)
    assert p.allowed(INLINE_MAX) and not p.allowed(INLINE_MAX + 1)
    assert p.summary() == "100 writes inline, 0 in threads, 0 slow"


def test_a_slow_write_holds_writes_in_threads_and_repeated_slowness_backs_off() -> None:
    clock = Clock()
    p = InlineWrites(clock=clock)
    p.record(SLOW * 5, inline=True)  # pressure starts: one slow write on the loop
    assert not p.allowed(4096)
    clock.now += HOLD / 2
    p.record(SLOW * 5, inline=False)  # still slow in a thread: the hold is extended
    clock.now += HOLD / 2 + 0.01
    assert not p.allowed(4096)
    clock.now += HOLD / 2
    assert p.allowed(4096)
    # The probe is slow again: twice as long each time, up to MAX_HOLD.
    holds = []
    for _ in range(10):
        assert p.allowed(4096)
        p.record(SLOW * 5, inline=True)
        holds.append(p.threaded_until - clock.now)
        clock.now = p.threaded_until
    assert holds[:3] == [2 * HOLD, 4 * HOLD, 8 * HOLD] and holds[-1] == MAX_HOLD
    # A fast probe: pressure is over, the next slow write holds for HOLD again.
    p.record(SLOW / 10, inline=True)
    p.record(SLOW / 10, inline=True)
    p.record(SLOW * 5, inline=True)
    assert p.threaded_until - clock.now == HOLD
    assert p.summary() == "14 writes inline, 1 in threads, 13 slow"
