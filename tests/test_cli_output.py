"""Output for scripts and for people (SPEC §12): JSON with one schema each,
columns on a terminal, exact tab-separated values in a pipe, and what a
prune makes of an incremental (a full, under its old name)."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import subprocess
from pathlib import Path
from typing import Any

from backupfs.cli_output import short_size
from backupfs.mountstatus import XATTR_SIZE_MAX, decode_status, encode_status
from backupfs.status import JobStatus
from engine.integrity import Problem, VerifyReport
from engine.qcow2.layers import DATA, open_layer
from engine.repo import Repository
from tests.commands import backupfs_cmd, cli

KiB = 1024
MiB = 1024 * KiB
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def on_a_terminal(*args: str | os.PathLike[str]) -> str:
    """`backupfs ARGS` with its stdout on a pseudo-terminal, as a person runs it."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(backupfs_cmd() + [str(a) for a in args], stdout=follower,
                                stderr=subprocess.PIPE, close_fds=True)
        os.close(follower)
        follower = -1
        out = bytearray()
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed its side
                break
            if not chunk:
                break
            out += chunk
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and b"Traceback" not in err, err
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return out.decode().replace("\r\n", "\n")


def _chain(repo: Repository, tmp_path: Path) -> tuple[Path, list[str]]:
    """A device with full, incremental, incremental, each with changes (5 MiB source)."""
    src = tmp_path / "vm.img"
    rng = random.Random(3)
    src.write_bytes(rng.randbytes(5 * MiB))
    repo.add_device("vm", str(src), 64 * KiB)
    ids = [repo.backup("vm", "full", label="first").record.id]
    for i in range(2):
        repo.device("vm").write(i * MiB, rng.randbytes(100 * KiB))
        ids.append(repo.backup("vm", "incremental").record.id)
    return src, ids


def test_short_sizes_as_ls_h_shows_them() -> None:
    assert [short_size(n) for n in (0, 512, 1023, 1024, 1536, 64 * KiB, 10 * MiB + 1, 3 * 2**30 // 2, 2**40)] == \
        ["0", "512", "1023", "1K", "1.5K", "64K", "10M", "1.5G", "1T"]


def test_list_and_device_list_for_people_and_for_pipes(repo: Repository, tmp_path: Path) -> None:
    src, ids = _chain(repo, tmp_path)
    stored = [b.stored_bytes for b in repo.backups("vm")]
    repo.close()
    # A pipe: tab-separated, exact bytes; list keeps its header line, device list has none.
    piped = cli("list", repo.path).stdout.decode().splitlines()
    assert piped[0].split("\t") == ["ID", "DEVICE", "KIND", "PARENT", "CREATED", "CLUSTER", "STORED", "LABEL"]
    assert [line.split("\t")[6] for line in piped[1:]] == [str(s) for s in stored]
    assert piped[1].split("\t")[5] == str(64 * KiB) and piped[1].split("\t")[7] == "first"
    assert cli("device", "list", repo.path).stdout.decode() == f"vm\t{src}\t{5 * MiB}\t{64 * KiB}\tnone\n"
    # A terminal: a header, columns aligned under it, sizes as people read them.
    shown = on_a_terminal("list", repo.path).splitlines()
    assert shown[0].split() == ["ID", "DEVICE", "KIND", "PARENT", "CREATED", "CLUSTER", "STORED", "LABEL"]
    assert "\t" not in "".join(shown)
    kind_at = shown[0].index("KIND")
    assert [line[kind_at:].split()[0] for line in shown[1:]] == ["full", "incremental", "incremental"]
    assert shown[1].split()[5] == "64K" and shown[1].split()[6] == short_size(stored[0])
    assert short_size(stored[0]).endswith("M")  # 5 MiB of random data: not bytes
    devices = on_a_terminal("device", "list", repo.path).splitlines()
    assert devices[0].split() == ["NAME", "SOURCE", "SIZE", "GRANULARITY", "COMPRESS"]
    assert devices[1].split() == ["vm", str(src), "5M", "64K", "none"]
    assert devices[1].index(str(src)) == devices[0].index("SOURCE")


def test_a_pruned_full_makes_its_child_a_full_under_its_old_name(repo: Repository, tmp_path: Path) -> None:
    _src, ids = _chain(repo, tmp_path)
    repo.prune("vm", None, ids[0])
    repo.close()
    rows = json.loads(cli("list", repo.path, "--json").stdout)
    assert [(r["id"], r["kind"], r["parent"]) for r in rows] == [(ids[1], "full", None),
                                                                   (ids[2], "incremental", ids[1])]
    assert ids[1].endswith("-incremental")  # the id keeps the kind it was taken as
    # --kind filters by what a backup is now: the way to find fulls, not the id's suffix.
    assert [line.split("\t")[0] for line in cli("list", repo.path, "--kind", "full").stdout.decode().splitlines()[1:]] \
        == [ids[1]]
    assert [r["id"] for r in json.loads(cli("list", repo.path, "vm", "--kind", "incremental", "--json").stdout)] \
        == [ids[2]]


def test_status_json_unmounted(repo: Repository, tmp_path: Path) -> None:
    _src, ids = _chain(repo, tmp_path)
    repo.device("vm").write(0, b"\x01" * 100)  # one granule dirty since the last backup
    repo.close()
    doc = json.loads(cli("status", repo.path, "--json").stdout)
    assert doc["mounted"] is False and doc["mountpoint"] is None and doc["dead_mount"] is None
    assert doc["repository"] == str(repo.path)
    (dev,) = doc["devices"]
    assert (dev["name"], dev["size"], dev["granularity"], dev["error"], dev["job"]) == ("vm", 5 * MiB, 64 * KiB,
                                                                                       None, None)
    assert dev["bitmap"] == {"trusted": True, "untrusted_reason": None, "granularity": 64 * KiB,
                             "dirty_since_last": 64 * KiB, "dirty_since_full": dev["bitmap"]["dirty_since_full"]}
    assert dev["bitmap"]["dirty_since_full"] >= 2 * 64 * KiB  # the incrementals' changes too
    assert dev["latest_backup"] == ids[-1]
    jobs = dev["recent_jobs"]
    assert [j["kind"] for j in jobs] == ["incremental", "incremental", "full"]  # newest first, three
    assert jobs[0]["state"] == "succeeded" and jobs[0]["backup"] == ids[-1] and ISO.fullmatch(jobs[0]["started"])
    assert isinstance(jobs[0]["started_ns"], int) and jobs[0]["error"] is None


def test_verify_json_unmounted_ok_and_bad(repo: Repository, tmp_path: Path) -> None:
    _src, ids = _chain(repo, tmp_path)
    image = tmp_path / "repo" / repo.catalog.backup(ids[1]).image  # type: ignore[union-attr]
    repo.close()
    good = cli("verify", repo.path, "--json")
    doc = json.loads(good.stdout)
    assert doc["ok"] is True and doc["checked"] == ids and doc["bad"] == [] and doc["problems"] == []
    assert doc["bytes_read"] > 5 * MiB
    with open_layer(str(image), "qcow2") as layer:
        guest, host = next((e.start, e.host) for e in layer.allocation() if e.kind == DATA)
    with open(image, "r+b") as f:
        f.seek(host + 77)
        f.write(b"\xde\xad")
    bad = cli("verify", repo.path, "vm", "--json", check=False)
    assert bad.returncode == 1  # as without --json
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["bad"] == ids[1:]  # the one after reads through it
    first = doc["problems"][0]
    assert first == {"backup": ids[1], "problem": "stored data fails its checksum",
                     "offset": guest - guest % (64 * KiB), "harms_reads": True,
                     "inherited": False}
    assert any(p["backup"] == ids[2] and "reads through damaged backup" in p["problem"] and p["inherited"]
               for p in doc["problems"])
    assert doc["advice"] and all(isinstance(a, str) for a in doc["advice"])  # what to do, as the text says


def test_verify_report_read_back_from_its_text() -> None:
    """A mounted verify too big for the job status is read from the text: the same report."""
    report = VerifyReport(
        checked=["20261127T090000Z-0001-full", "20261127T090000Z-0002-incremental", "20261127T090000Z-0003-full"],
        problems=[Problem("20261127T090000Z-0002-incremental", "stored data fails its checksum", 65536),
                  Problem("20261127T090000Z-0002-incremental", "image structure: 3 leaked clusters",
                          harms_reads=False),
                  Problem("20261127T090000Z-0003-full", "image unreadable: bad: header at offset")],
        bytes_read=123456,
        advice=["what to do: take a full backup", "  backupfs backup REPO vm full"],
    )
    back = VerifyReport.from_rendered(report.render().splitlines())
    assert back.data() == report.data()


def test_a_verify_report_too_big_for_the_status_is_left_out() -> None:
    status = JobStatus()
    status.begin("verify")
    status.report = VerifyReport(checked=[f"20261127T090000Z-{i:04d}-incremental" for i in range(4000)]).data()
    status.succeed(lines=[f"report: ok  20261127T090000Z-{i:04d}-incremental" for i in range(4000)])
    value = encode_status(status.fields())
    assert len(value) <= XATTR_SIZE_MAX
    fields: Any = decode_status(value)
    assert fields["report"] is None and fields["lines"] == [] and fields["lines_left_out"] == 4000
    small = JobStatus()
    small.begin("verify")
    small.report = VerifyReport(checked=["a"]).data()
    small.succeed()
    assert decode_status(encode_status(small.fields()))["report"] == small.report  # type: ignore[typeddict-item]
