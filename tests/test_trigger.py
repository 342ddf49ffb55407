"""The trigger grammar: what is accepted, and that nothing else escapes as a crash."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupfs.trigger import (
    PruneCommand,
    TriggerCommand,
    TriggerError,
    VerifyCommand,
    parse_trigger,
)
from engine.units import MIN_RATE

EXAMPLES = int(os.environ.get("TRIGGER_EXAMPLES", "500"))  # the long run: 10000


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"full\n", TriggerCommand("full")),
        (b"incremental", TriggerCommand("incremental")),
        (b"incremental\r\n", TriggerCommand("incremental")),  # a script with DOS line ends
        (b"differential cluster_size=128K\n", TriggerCommand("differential", cluster_size=128 * 1024)),
        (b"full label='nightly run' rate=50M scan=0 auto_full=yes",
         TriggerCommand("full", label="nightly run", rate=50 * 1024 * 1024, auto_full=True)),
        (b"incremental cluster_size=2M scan=1", TriggerCommand("incremental", cluster_size=2 << 20, scan=True)),
        (b"incremental empty=1", TriggerCommand("incremental", empty=True)),
        (b"differential empty=0 scan=1", TriggerCommand("differential", scan=True)),
        (b"verify\n", VerifyCommand()),
        (b"verify backup=20261127T090000Z-0001-full", VerifyCommand("20261127T090000Z-0001-full")),
        (b"prune keep_last=3 keep_daily=7 dry_run=1", PruneCommand(keep_last=3, keep_daily=7, dry_run=True)),
        (b"prune remove=X", PruneCommand(remove="X")),
    ],
)
def test_accepted(line: bytes, expected: object) -> None:
    assert parse_trigger(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        (b"", "empty command"),
        (b"\n", "empty command"),
        (b"snapshot", "unknown backup kind 'snapshot'"),
        (b"FULL", "unknown backup kind"),
        (b"full cluster_size=3K", "not a power of two"),
        (b"full cluster_size=256", "out of range"),
        (b"full cluster_size=4M", "out of range"),
        (b"full cluster_size=lots", "is not a size"),
        (b"full colour=blue", "unknown key 'colour'"),
        (b"full label", "is not key=value"),
        (b"full label=a label=b", "given twice"),
        (b"full scan=maybe", "not a yes/no value"),
        (b"incremental empty=2", "not a yes/no value"),
        (b"full rate=100", "at least 1M"),
        (b"full\nincremental\n", "one command per write"),
        (b"full\rincremental", "one command per write"),
        (b"full\r\r\n", "one command per write"),
        (b"full 'unclosed", "cannot parse"),
        (b"full\x00", "NUL"),
        (b"\xff\xfe", "not UTF-8"),
        (b"full " + b"x" * 2000, "too long"),
        (b"prune", "needs either keep_* rules or remove=ID"),
        (b"prune keep_last=0", "at least 1"),
        (b"prune keep_last=3 remove=X", "needs either"),
        (b"verify bogus=1", "unknown key"),
        (b"full label=" + "\u200b\x07".encode(), "printable"),
    ],
)
def test_refused_with_a_reason(line: bytes, message: str) -> None:
    with pytest.raises(TriggerError) as info:
        parse_trigger(line)
    assert message in str(info.value)
    assert info.value.errno == 22


@given(st.binary(max_size=1500))
@settings(max_examples=EXAMPLES, deadline=1000)
def test_fuzz_bytes_parse_or_refuse(data: bytes) -> None:
    try:
        cmd = parse_trigger(data)
    except TriggerError:
        return
    # Whatever parses prints back to a line that parses to the same command.
    assert parse_trigger(cmd.line().encode()) == cmd


_WORDS = st.sampled_from(
    ["full", "incremental", "differential", "verify", "prune", "cluster_size=", "label=", "scan=", "auto_full=",
     "rate=", "empty=", "keep_last=", "remove=", "dry_run=", "backup=", "64K", "1", "0", "'", '"', "=", " ", "\t", "\n", "x"]
)


@given(st.lists(_WORDS, max_size=12).map("".join))
@settings(max_examples=EXAMPLES, deadline=1000)
def test_fuzz_near_grammar(text: str) -> None:
    try:
        cmd = parse_trigger(text.encode())
    except TriggerError:
        return
    assert parse_trigger(cmd.line().encode()) == cmd


def test_the_rate_minimum_is_the_engines() -> None:
    """The trigger refuses exactly what the engine would, and takes its least."""
    assert parse_trigger(f"full rate={MIN_RATE}".encode()).rate == MIN_RATE
    with pytest.raises(TriggerError, match="rate must be at least 1M"):
        parse_trigger(f"full rate={MIN_RATE - 1}".encode())
