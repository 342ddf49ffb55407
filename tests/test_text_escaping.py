"""Text and options from outside: names an image or a user made never reach a
terminal, a log or a mount's options as they are.

- file names with ESC sequences, newlines, tabs, C1 and bidi characters,
  imported as labels: `list`, `status`, the chain file, the snapshot status,
  the log and the label xattr stay one printable line per row;
- a repository path is never read as mount options (`crepo,allow_other`,
  `-oallow_other`), a non-ASCII or non-UTF-8 one mounts and unmounts cleanly;
- every mount is nosuid,nodev, whatever -o asks;
- the systemd units quote their variables and pass paths after `--`;
- a catalog row edited to name a file outside the repository is refused with
  a clear error, and that file is neither read nor deleted.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli
from tests.mounts import Mounted
from tests.oracle import qemu_img, qemu_io
from tests.users import OtherUser

MiB = 1024 * 1024
SCRIPTS = Path(__file__).resolve().parent.parent / "mount-scripts"

# A file name that, printed raw, clears nothing but does everything else: a
# colour, a forged row of `list` (newline, tab-separated fields), a C1 NEL
# and a right-to-left override.
HOSTILE = "base\x1b[31mred\nID\tDEVICE\tfull\x85\u202e.qcow2"


def assert_printable(out: bytes | str, what: str) -> str:
    """``out`` is UTF-8 with no control, format or separator character but
    newline and tab (where the output's own layout puts them)."""
    text = out.decode("utf-8") if isinstance(out, bytes) else out
    bad = [c for c in text if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    assert not bad, f"{what} holds raw control characters {bad!r}:\n{text!r}"
    return text


def mountinfo(mnt: Path) -> tuple[bytes, bytes, set[str], set[str]] | None:
    """(mount point, source, mount options, super options) of the mount at
    ``mnt``, as bytes with the kernel's octal escapes undone."""
    target = os.fsencode(os.path.abspath(mnt))

    def unescape(field: bytes) -> bytes:
        return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)

    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, rfields = left.split(), right.split()
            if unescape(fields[4]) == target:
                return (target, unescape(rfields[1]), set(fields[5].decode().split(",")),
                        set(rfields[2].decode().split(",")))
    return None


@pytest.fixture
def imported(tmp_path: Path) -> Iterator[tuple[Path, list[str], bytes]]:
    """A repository with device `imp` imported from a QEMU chain whose base's
    file name is HOSTILE (the tip names it as its relative backing file);
    (repository, the ids of the two backups, what `import` printed)."""
    chain = tmp_path / "chain"
    chain.mkdir()
    base = chain / HOSTILE
    qemu_img("create", "-q", "-f", "qcow2", base, str(8 * MiB))
    qemu_io(base, "write -P 0x11 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", HOSTILE, "-F", "qcow2", "top.qcow2", cwd=chain)
    qemu_io(chain / "top.qcow2", "write -P 0x22 1M 64k")
    repo = tmp_path / "repo"
    cli("init", repo)
    out = cli("import", repo, "imp", chain / "top.qcow2").stdout
    ids = [line.split(b"\t")[0].decode() for line in out.splitlines() if line[:1].isdigit()]
    yield repo, ids, out


def test_imported_label_is_escaped_in_list_and_status(imported: tuple[Path, list[str], bytes]) -> None:
    repo, ids, import_output = imported
    out = assert_printable(cli("list", repo).stdout, "list")
    rows = out.splitlines()
    assert len(rows) == 3, rows  # the header and one row a backup: no forged row
    for row in rows:
        assert len(row.split("\t")) == 8, row
    label = rows[1].split("\t")[7]
    # The name is all there, escaped (the backslashes of the stored escapes doubled).
    assert label.startswith("imported from base") and "[31mred" in label and "x1b" in label, label
    assert "u202e" in label and "x85" in label
    assert [r.split("\t")[0] for r in rows[1:]] == ids
    assert_printable(cli("list", repo, "imp").stdout, "list imp")
    assert_printable(cli("status", repo).stdout, "status")
    assert_printable(cli("verify", repo).stdout, "verify")
    assert len(assert_printable(import_output, "import's output").splitlines()) == 2


@pytest.mark.mount
def test_chain_file_xattr_snapshot_status_and_log_are_escaped(imported: tuple[Path, list[str], bytes],
                                                              tmp_path: Path) -> None:
    repo, ids, _ = imported
    src = tmp_path / "live.img"
    src.write_bytes(b"\x33" * 8 * MiB)
    cli("device", "add", repo, "live", src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt)
    m.start()
    try:
        chain = assert_printable((mnt / "imp" / "chain").read_bytes(), "the chain file")
        assert len(chain.splitlines()) == 3, chain
        label = os.getxattr(mnt / "imp" / "backups" / ids[0], "user.backupfs.label")
        assert_printable(label, "the label xattr")
        assert label.startswith(b"imported from base") and b"x1b[31mred" in label

        # A verify of a backup id with ESC, C1 NEL and a line separator: the
        # job fails; its status, `status` and the log show the id escaped.
        hostile_id = "\x1b[2J\x85x\u2028state:succeeded"
        fd = os.open(mnt / "imp" / "snapshot", os.O_WRONLY)
        try:
            with pytest.raises(OSError):
                os.write(fd, f"verify backup={hostile_id}\n".encode())
        finally:
            os.close(fd)
        status = assert_printable((mnt / "imp" / "snapshot").read_bytes(), "the snapshot status")
        assert "state: failed" in status.splitlines() and "state: succeeded" not in status.splitlines()
        assert_printable(cli("status", repo, check=False).stdout, "status of the mounted repository")
        out = cli("verify", repo, "imp", "--backup", hostile_id, check=False)
        assert out.returncode == 1
        assert_printable(out.stdout + out.stderr, "verify through the mount")

        # A labelled backup through the trigger: the label (a backslash in
        # it) is shown in the status and the chain as `list` shows it.
        (mnt / "live" / "snapshot").write_text("full label='C:\\backups nightly'\n")
        status = assert_printable((mnt / "live" / "snapshot").read_bytes(), "the snapshot status")
        assert "state: succeeded" in status.splitlines()
        assert "C:\\\\backups nightly" in (mnt / "live" / "chain").read_text()
    finally:
        m.cleanup()
    log = assert_printable(m.log(), "the daemon's log")
    for line in log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line), f"a forged log line: {line!r}"
    assert "x1b[2J" in log  # the failed verify was logged, escaped


def test_long_hostile_names_make_labels_within_the_rule(tmp_path: Path) -> None:
    """A 250-byte name made of control characters: escaped, it is four
    times longer; the label still keeps to the 200-character rule."""
    chain = tmp_path / "chain"
    chain.mkdir()
    name = "\x1b" * 240 + ".qcow2"
    qemu_img("create", "-q", "-f", "qcow2", chain / name, str(1 * MiB))
    repo = tmp_path / "repo"
    cli("init", repo)
    cli("import", repo, "imp", chain / name)
    rows = assert_printable(cli("list", repo).stdout, "list").splitlines()
    label = rows[1].split("\t")[7]
    assert label.startswith("imported from ") and label.endswith(".qcow2 (qcow2)") and "..." in label
    with sqlite3.connect(repo / "catalog.db") as db:
        (stored,) = db.execute("SELECT label FROM backups").fetchone()
    assert len(stored) <= 200 and stored.isprintable()


# -- the repository path and mount options ---------------------------------------------------


def _repo_with_device(repo: Path, src: Path) -> None:
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
    cli("init", repo)
    cli("device", "add", repo, "d1", src)


@pytest.mark.mount
def test_a_comma_in_the_repository_path_adds_no_option(open_tmp: Path, other_user: OtherUser) -> None:
    repo = open_tmp / "crepo,allow_other"
    _repo_with_device(repo, open_tmp / "d1.img")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    mnt.chmod(0o755)
    m = Mounted(repo, mnt)
    m.start()
    try:
        found = mountinfo(mnt)
        assert found is not None
        _, source, options, super_options = found
        proc = other_user.run("ls", mnt)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (proc.stdout, proc.stderr)
        assert "allow_other" not in super_options, super_options
        assert source == os.fsencode(repo)  # the whole path, comma and all, is the source
        assert {"nosuid", "nodev"} <= options, options
        assert os.listdir(mnt) == ["d1"]  # its owner sees it
    finally:
        m.cleanup()


@pytest.mark.mount
@pytest.mark.parametrize("name", ["répö", os.fsdecode(b"r\xe9p\xf6-not-utf8"), "back\\slash and space"])
def test_any_repository_path_mounts_and_unmounts_cleanly(tmp_path: Path, name: str) -> None:
    repo = tmp_path / name
    _repo_with_device(repo, tmp_path / "d1.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt)
    m.start()
    try:
        found = mountinfo(mnt)
        assert found is not None and found[1] == os.fsencode(repo), found
        assert {"nosuid", "nodev"} <= found[2]
        assert (mnt / "d1" / "device").stat().st_size == 4 * MiB
        status = assert_printable(cli("status", repo).stdout, "status")
        assert status.startswith("mounted at ")
        m.stop()
    finally:
        m.cleanup()
    assert mountinfo(mnt) is None
    status = cli("status", repo).stdout.decode()
    assert "bitmap: trusted" in status, status  # the daemon closed the repository: bitmaps saved clean


@pytest.mark.mount
@pytest.mark.parametrize("option", ["suid", "dev", "allow_other,suid"])
def test_options_that_undo_nosuid_nodev_are_refused(tmp_path: Path, option: str) -> None:
    repo = tmp_path / "repo"
    _repo_with_device(repo, tmp_path / "d1.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = cli("mount", repo, mnt, "-o", option, check=False)
        assert proc.returncode == 1
        err = proc.stderr.decode()
        assert len(err.splitlines()) == 1 and "nosuid,nodev" in err, err
        assert mountinfo(mnt) is None
    finally:
        Mounted(repo, mnt).cleanup()  # a mount made against the rule is not left behind


@pytest.mark.mount
def test_a_repository_named_like_an_option_is_a_repository(open_tmp: Path) -> None:
    """mount.backupfs (as mount(8) calls it) and `backupfs mount --` take a
    repository named `-oallow_other` as a path, never as options."""
    repo = open_tmp / "-oallow_other"
    _repo_with_device(repo, open_tmp / "d1.img")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    helper_env = {**os.environ, "BACKUPFS": backupfs_cmd()[0]}  # the installed console script
    for how in ("helper", "cli"):
        m = Mounted(repo, mnt)
        try:
            if how == "helper":
                proc = subprocess.run([str(SCRIPTS / "mount.backupfs"), "-oallow_other", str(mnt), "-o", "noatime"],
                                      cwd=open_tmp, env=helper_env, capture_output=True, text=True, timeout=60)
            else:
                proc = subprocess.run(backupfs_cmd() + ["mount", "--", "-oallow_other", str(mnt)],
                                      cwd=open_tmp, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            m.pid = int(json.loads((repo / "mount.json").read_text())["pid"])
            found = mountinfo(mnt)
            assert found is not None and found[1] == os.fsencode(repo), found
            assert "allow_other" not in found[3]
            m.stop()
        finally:
            m.cleanup()


def test_units_quote_every_variable_and_pass_paths_after_dashes() -> None:
    """A space or a leading '-' in a configured path is part of the path."""
    for unit in ("backupfs@.service", "backupfs-snapshot@.service"):
        for line in (SCRIPTS / unit).read_text().splitlines():
            if not line.startswith("Exec"):
                continue
            unquoted = re.findall(r'(?<!")(?:\$\{\w+\}|%[fi])', line)
            assert not unquoted, f"{unit}: {line}"
            paths = ('"${BACKUPFS_MOUNTPOINT}"', '"${BACKUPFS_REPO}"', '"%f"', '"%i"')
            first_path = min(line.index(p) for p in paths if p in line)
            assert " -- " in line[:first_path], f"{unit}: {line}"


# -- a catalog changed behind backupfs's back --------------------------------------------------


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, str, Path]:
    """A repository with one full backup of d1; (repository, its id, a file
    outside the repository whose every read and deletion would show)."""
    repo = tmp_path / "repo"
    _repo_with_device(repo, tmp_path / "d1.img")
    cli("backup", repo, "d1", "full")
    (backup_id,) = [line.split(b"\t")[0].decode() for line in cli("list", repo).stdout.splitlines()[1:]]
    victim = tmp_path / "victim.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", victim, str(4 * MiB))
    os.utime(victim, (1000, time.time()))  # relatime: the next read moves the atime
    return repo, backup_id, victim


TAMPERINGS = {
    "image outside": ("UPDATE backups SET image = '../victim.qcow2'", "image path"),
    "image climbing out": ("UPDATE backups SET image = 'devices/d1/../../../victim.qcow2'", "image path"),
    "absolute image": ("UPDATE backups SET image = '{victim}'", "image path"),
    "absolute checksums": ("UPDATE backups SET checksums = '{victim}'", "checksum file path"),
    "device name": ("UPDATE backups SET device = 'a/../b'; UPDATE devices SET name = 'a/../b'", "device"),
    "backup id": ("UPDATE backups SET id = '../../victim'", "backup"),
}


@pytest.mark.mount
@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_tampered_catalog_row_is_refused(backed_up: tuple[Path, str, Path], tmp_path: Path,
                                           tampering: str) -> None:
    repo, backup_id, victim = backed_up
    sql, what = TAMPERINGS[tampering]
    db = sqlite3.connect(repo / "catalog.db")
    db.executescript(sql.format(victim=victim))
    db.close()
    atime = os.stat(victim).st_atime_ns
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for args in (["list", repo], ["verify", repo], ["status", repo], ["mount", repo, mnt],
                     ["device", "remove", "--force", repo, "d1"], ["prune", repo, "d1", "--keep-last", "1"]):
            proc = cli(*args, check=False)
            err = proc.stderr.decode()
            assert proc.returncode != 0, (args, err)
            assert len(err.splitlines()) == 1, (args, err)
            assert str(repo / "catalog.db") in err and what in err and "changed outside backupfs" in err, (args, err)
            assert mountinfo(mnt) is None
    finally:
        Mounted(repo, mnt).cleanup()
    assert victim.exists() and os.stat(victim).st_atime_ns == atime  # neither read nor deleted


def test_a_tampered_job_row_reaches_no_terminal(backed_up: tuple[Path, str, Path]) -> None:
    """The jobs table is not checked at open (nothing in it names a file), so
    every field of it that `status` prints is escaped: its state was not."""
    repo, _backup_id, _victim = backed_up
    db = sqlite3.connect(repo / "catalog.db")
    db.execute("UPDATE jobs SET state = ?, kind = ?, error = ?", ("fail\x1b]0;owned\x07ed", "full\x1b[2J", "x\ny"))
    db.commit()
    db.close()
    out = cli("status", repo).stdout.decode()
    assert "\x1b" not in out and "\x07" not in out, out
    assert "job 1 full\\x1b[2J " in out and " fail\\x1b]0;owned\\x07ed: x\\ny" in out, out


def test_a_source_path_is_escaped_when_a_device_is_rebound(tmp_path: Path) -> None:
    """`device add` printed the source escaped; `device add --replace` printed it as it was."""
    repo = tmp_path / "repo"
    _repo_with_device(repo, tmp_path / "d1.img")
    other = tmp_path / HOSTILE.replace("/", "_")
    with open(other, "wb") as f:
        f.truncate(4 * MiB)
    out = cli("device", "add", "--replace", repo, "d1", other).stdout.decode()
    assert len(out.splitlines()) == 1, out
    assert_printable(out, "device add --replace")
    assert "base\\x1b[31mred\\nID\\tDEVICE" in out, out


@pytest.mark.mount
def test_the_mount_commands_notice_is_escaped(tmp_path: Path) -> None:
    """The daemon hands the mount command its notices (a repository made
    private) through a pipe; the command printed them as they came, with the
    repository's path raw: every other command escapes them."""
    repo = tmp_path / "r\x1b[31m"
    _repo_with_device(repo, tmp_path / "d1.img")
    (repo / "devices").chmod(0o755)  # as an older version left it: the mount makes it private, and says so
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(repo, mnt)
    try:
        proc = cli("mount", repo, mnt)
        m.pid = json.loads((repo / "mount.json").read_text())["pid"]
        err = assert_printable(proc.stderr, "the mount's notice")
        assert "r\\x1b[31m was readable by other users" in err, err
        m.stop()
    finally:
        m.cleanup()
