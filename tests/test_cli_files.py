"""`backupfs ls | dump | restore --include`: the files inside a backup, from the shell, no mount.

One disk is built once for the module with the real tools, no mount and no
loop device: a GPT (sgdisk) with p1 FAT (mkfs.vfat + mcopy), p2 ext4 made
with `mkfs.ext4 -d` from a directory whose contents the tests know, and p3
holding only an XFS signature (a damaged volume). It goes behind a
repository device with a full backup; every test then compares what the
commands give with what was put in.
"""

from __future__ import annotations

import io
import json
import os
import pty
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.commands import backupfs_cmd, cli, sh

MiB = 1024 * 1024
FSTAB = b"/dev/vda2 / ext4 defaults 0 1\n"
FSTAB_MTIME = 1577934245  # 2020-01-02T03:04:05Z
BAD_NAME = b"bad\xffname"  # not UTF-8
NEWLINE_NAME = b"two\nlines"


@dataclass
class Backup:
    repo: Path
    src: Path  # what p2 was made from
    big: bytes  # p2/data/big's bytes

    def run(self, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess:
        """`backupfs CMD REPO vm latest ARGS...`."""
        return cli(args[0], self.repo, "vm", "latest", *args[1:], check=check)


def _fill_ext4_source(src: Path) -> bytes:
    """The tree p2 is made from; returns the big file's bytes."""
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "fstab").write_bytes(FSTAB)
    os.chmod(src / "etc" / "fstab", 0o640)
    os.utime(src / "etc" / "fstab", (FSTAB_MTIME, FSTAB_MTIME))
    os.link(src / "etc" / "fstab", src / "etc" / "fstab.hard")
    os.symlink("../etc/fstab", src / "etc" / "link")
    os.mkfifo(src / "etc" / "pipe")
    (src / "data" / "deep").mkdir(parents=True)
    big = os.urandom(3 * MiB + 123)  # more than a pipe holds, across 1 MiB pieces
    (src / "data" / "big").write_bytes(big)
    (src / "data" / "deep" / "owned").write_bytes(b"owned\n")
    os.chown(src / "data" / "deep" / "owned", 1234, 5678)
    os.setxattr(src / "data" / "deep" / "owned", "user.note", b"kept")
    os.chmod(src / "data" / "deep", 0o750)
    os.utime(src / "data" / "deep", (1600000000, 1600000000))
    os.close(os.open(os.path.join(os.fsencode(src / "data"), BAD_NAME), os.O_CREAT | os.O_WRONLY, 0o600))
    os.close(os.open(os.path.join(os.fsencode(src / "data"), NEWLINE_NAME), os.O_CREAT | os.O_WRONLY, 0o600))
    (src / "broken").mkdir()
    (src / "broken" / "bad").write_bytes(b"its extent header is overwritten after mkfs\n")
    (src / "broken" / "good").write_bytes(b"good\n")
    return big


def _build_disk(disk: Path, src: Path) -> None:
    """GPT: p1 FAT (4 MiB at 1 MiB), p2 ext4 from ``src`` (20 MiB) with one file
    damaged, p3 a fake XFS (1 MiB)."""
    with open(disk, "wb") as f:
        f.truncate(28 * MiB)
    sh(f"sgdisk -n1:2048:+4M -t1:0700 -n2:0:+20M -n3:0:+1M {disk}")
    sh(f"mkfs.vfat --offset 2048 {disk} 4096 && mcopy -i {disk}@@1M {src}/etc/fstab ::/README.TXT")
    sh(f"mkfs.ext4 -q -d {src} -E offset={5 * MiB} {disk} 20M")
    # One damaged file: its inode's extent header (i_block[0]) is no longer one.
    sh(f"debugfs -w -R 'sif /broken/bad block[0] 0x12345678' '{disk}?offset={5 * MiB}'")
    with open(disk, "r+b") as f:
        f.seek(25 * MiB)
        f.write(b"XFSB" + bytes(508))  # a signature and nothing that makes a filesystem


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    top = tmp_path_factory.mktemp("files")
    src = top / "src"
    big = _fill_ext4_source(src)
    disk = top / "disk.img"
    _build_disk(disk, src)
    repo = top / "repo"
    cli("init", repo)
    cli("device", "add", repo, "vm", disk)
    cli("backup", repo, "vm", "full")
    return Backup(repo, src, big)


def test_ls_volumes(backup: Backup) -> None:
    assert backup.run("ls").stdout.decode().split() == ["p1", "p2", "p3"]
    rows = [line.split("\t") for line in backup.run("ls", "-l").stdout.decode().splitlines()]
    assert rows[0][:4] == ["p1", str(MiB), str(4 * MiB), "fat12"] and rows[0][5] == "ok"
    assert rows[1][:4] == ["p2", str(5 * MiB), str(20 * MiB), "ext4"] and rows[1][5] == "ok"
    assert rows[2][0] == "p3" and rows[2][5].startswith("damaged")
    volumes = json.loads(backup.run("ls", "--json").stdout)
    assert [(v["name"], v["type"], v["state"]) for v in volumes] == [
        ("p1", "volume", "ok"), ("p2", "volume", "ok"), ("p3", "volume", "damaged")]


def test_ls_directory_plain_long_recursive(backup: Backup) -> None:
    names = backup.run("ls", "p2/data").stdout.decode().splitlines()
    assert names == ["bad\\xffname", "big", "deep", "two\\nlines"]  # byte order, escaped
    lines = backup.run("ls", "p2/etc", "-l").stdout.decode().splitlines()
    assert lines[0] == f"-rw-r----- 2 0 0 {len(FSTAB)} 2020-01-02T03:04:05Z fstab"
    assert lines[1].endswith(" fstab.hard") and lines[1].startswith("-rw-r----- 2 ")
    assert lines[2].startswith("lrwxrwxrwx 1 0 0 12 ") and lines[2].endswith(" link -> ../etc/fstab")
    assert lines[3].startswith("prw-r--r-- 1 0 0 0 ") and lines[3].endswith(" pipe")
    assert len(lines) == 4
    owned = backup.run("ls", "p2/data/deep/owned", "-l").stdout.decode()
    assert owned.startswith("-rw-r--r-- 1 1234 5678 6 ") and owned.endswith(" owned\n")  # a file lists itself
    tree = backup.run("ls", "p2/data", "-R").stdout.decode().splitlines()
    assert tree == ["bad\\xffname", "big", "deep", "deep/owned", "two\\nlines"]


def test_ls_json_gives_exact_names(backup: Backup) -> None:
    import base64

    entries = json.loads(backup.run("ls", "p2/data", "-R", "--json").stdout)
    by_path = {e["path"]: e for e in entries}
    bad = by_path["p2/data/bad\\xffname"]
    assert base64.b64decode(bad["name_b64"]) == BAD_NAME and base64.b64decode(bad["path_b64"]) == b"p2/data/" + BAD_NAME
    assert by_path["p2/data/two\nlines"]["name"] == "two\nlines"  # valid UTF-8: exact, JSON escapes it
    assert "name_b64" not in by_path["p2/data/two\nlines"]
    big = by_path["p2/data/big"]
    assert (big["type"], big["size"], big["mode"], big["nlink"]) == ("file", len(backup.big), 0o644, 1)
    deep = by_path["p2/data/deep"]
    assert (deep["type"], deep["mode"], deep["mtime_ns"]) == ("dir", 0o750, 1600000000 * 10**9)
    assert deep["mtime"] == "2020-09-13T12:26:40Z"  # as every --json gives a time: ISO 8601 UTC beside the ns
    owned = by_path["p2/data/deep/owned"]
    assert (owned["uid"], owned["gid"]) == (1234, 5678)
    link = json.loads(backup.run("ls", "p2/etc/link", "--json").stdout)
    assert [(e["type"], e["target"]) for e in link] == [("symlink", "../etc/fstab")]


def test_dump_file_streams_its_bytes(backup: Backup) -> None:
    assert backup.run("dump", "p2/etc/fstab").stdout == FSTAB
    assert backup.run("dump", "p2/data/big").stdout == backup.big
    assert backup.run("dump", "p1/README.TXT").stdout == FSTAB  # FAT
    # The reader leaves after a few bytes: a quiet end, as a tool killed by SIGPIPE.
    cmd = backupfs_cmd() + ["dump", str(backup.repo), "vm", "latest", "p2/data/big"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == backup.big[:10]
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b""


def test_dump_refuses_a_terminal(backup: Backup) -> None:
    main, tty = pty.openpty()
    try:
        proc = subprocess.run(backupfs_cmd() + ["dump", str(backup.repo), "vm", "latest", "p2/etc/fstab"],
                              stdout=tty, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(tty)
        os.close(main)
    assert proc.returncode == 1 and b"terminal" in proc.stderr


def test_dump_directory_as_tar(backup: Backup) -> None:
    stream = backup.run("dump", "p2/etc").stdout
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as tar:
        members = {}
        for m in tar:
            members[m.name] = m
            if m.isreg():
                extracted = tar.extractfile(m)
                assert extracted is not None and extracted.read() == FSTAB
    assert sorted(members) == ["etc", "etc/fstab", "etc/fstab.hard", "etc/link", "etc/pipe"]
    fstab = members["etc/fstab"]
    assert (fstab.mode, fstab.uid, fstab.gid, fstab.mtime, fstab.size) == (0o640, 0, 0, FSTAB_MTIME, len(FSTAB))
    assert members["etc/fstab.hard"].islnk() and members["etc/fstab.hard"].linkname == "etc/fstab"
    assert members["etc/link"].issym() and members["etc/link"].linkname == "../etc/fstab"
    assert members["etc/pipe"].isfifo() and members["etc"].isdir()
    with tarfile.open(fileobj=io.BytesIO(backup.run("dump", "p2/data").stdout), mode="r|") as tar:
        names = {m.name.encode("utf-8", "surrogateescape"): m for m in tar}
    assert b"data/" + BAD_NAME in names and b"data/" + NEWLINE_NAME in names
    owned = names[b"data/deep/owned"]
    assert (owned.uid, owned.gid, owned.uname) == (1234, 5678, "")


def test_restore_include_keeps_content_modes_times_links(backup: Backup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    said = backup.run("restore", out, "--include", "p2/etc", "--include", "p2/data/deep").stdout.decode()
    assert said.startswith("restored ") and "from p2 of backup " in said
    fstab = out / "etc" / "fstab"
    assert fstab.read_bytes() == FSTAB
    st = fstab.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == FSTAB_MTIME
    assert os.path.samefile(fstab, out / "etc" / "fstab.hard")  # one inode, as in the guest
    assert os.readlink(out / "etc" / "link") == "../etc/fstab"
    assert stat.S_ISFIFO((out / "etc" / "pipe").lstat().st_mode)
    deep = out / "data" / "deep"
    assert stat.S_IMODE(deep.stat().st_mode) == 0o750 and deep.stat().st_mtime == 1600000000
    owned = deep / "owned"
    assert owned.read_bytes() == b"owned\n" and os.getxattr(owned, "user.note") == b"kept"
    if os.geteuid() == 0:
        assert (owned.stat().st_uid, owned.stat().st_gid) == (1234, 5678)
    # data/ was made above an included path: it gets the guest's mode too.
    assert stat.S_IMODE((out / "data").stat().st_mode) == stat.S_IMODE((backup.src / "data").stat().st_mode)
    assert sorted(os.listdir(out / "data")) == ["deep"]


def test_restore_existing_file_kept_unless_force(backup: Backup, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "fstab").write_bytes(b"mine\n")
    refused = backup.run("restore", tmp_path, "--include", "p2/etc/fstab", check=False)
    assert refused.returncode == 1 and b"etc/fstab exists; give --force" in refused.stderr
    assert (tmp_path / "etc" / "fstab").read_bytes() == b"mine\n"
    backup.run("restore", tmp_path, "--include", "p2/etc/fstab", "--force")
    assert (tmp_path / "etc" / "fstab").read_bytes() == FSTAB
    assert [n for n in os.listdir(tmp_path / "etc") if n.startswith(".")] == []  # no temporary left


def test_restore_never_writes_through_a_symlink(backup: Backup, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "fstab"
    victim.write_bytes(b"not yours\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "etc").symlink_to(outside)
    refused = backup.run("restore", out, "--include", "p2/etc/fstab", "--force", check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == f"backupfs: error: {out}/etc is a symlink; refusing to write through it"
    assert os.listdir(outside) == ["fstab"] and victim.read_bytes() == b"not yours\n"
    # A symlink where the file goes: kept without --force; replaced itself (never followed) with it.
    (out / "etc").unlink()
    (out / "etc").mkdir()
    (out / "etc" / "fstab").symlink_to(victim)
    assert backup.run("restore", out, "--include", "p2/etc/fstab", check=False).returncode == 1
    backup.run("restore", out, "--include", "p2/etc/fstab", "--force")
    assert victim.read_bytes() == b"not yours\n" and not (out / "etc" / "fstab").is_symlink()
    assert (out / "etc" / "fstab").read_bytes() == FSTAB
    # DIR itself a symlink: refused.
    link_dir = tmp_path / "linkdir"
    link_dir.symlink_to(outside)
    refused = backup.run("restore", link_dir, "--include", "p2/etc/fstab", check=False)
    assert refused.returncode == 1 and b"is a symlink" in refused.stderr and os.listdir(outside) == ["fstab"]


@pytest.mark.parametrize("args, message", [
    (("ls", "p9"), "no volume 'p9' in this backup (volumes: p1, p2, p3)"),
    (("ls", "p2/nope/x"), "no such path in this backup: p2/nope"),
    (("dump", "p2/data/big/x"), "not a directory in this backup: p2/data/big"),
    (("dump", "p2/etc/pipe"), "p2/etc/pipe is a fifo: dump takes a regular file or a directory"),
    (("ls", "p2/../p1"), "'..' is not allowed"),
    (("ls", "p3"), "p3: damaged xfs filesystem"),
    (("dump", "p2/broken/bad"), "p2: broken/bad: inode 13: an extent node without its magic"),
])
def test_errors_are_one_line(backup: Backup, args: tuple[str, ...], message: str) -> None:
    proc = backup.run(*args, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and message in err and err.count("\n") == 1, err


def test_restore_skips_what_the_guest_cannot_give(backup: Backup, tmp_path: Path) -> None:
    proc = backup.run("restore", tmp_path, "--include", "p2/broken", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "p2: broken/bad: inode 13: an extent node" in err and "1 entry could not be read" in err
    assert os.listdir(tmp_path / "broken") == ["good"]  # no half-made file, no temporary left
    assert (tmp_path / "broken" / "good").read_bytes() == b"good\n"


def test_restore_a_whole_fat_volume_and_nested_includes(backup: Backup, tmp_path: Path) -> None:
    fat = tmp_path / "fat"
    fat.mkdir()
    backup.run("restore", fat, "--include", "p1")  # the volume's contents straight into DIR
    assert os.listdir(fat) == ["README.TXT"] and (fat / "README.TXT").read_bytes() == FSTAB
    both = tmp_path / "both"
    both.mkdir()
    said = backup.run("restore", both, "--include", "p2/etc/fstab", "--include", "p2/etc").stdout.decode()
    assert "1 file (30 bytes)" in said  # fstab once (inside etc); fstab.hard is its link
    assert sorted(os.listdir(both / "etc")) == ["fstab", "fstab.hard", "link", "pipe"]
    refused = backup.run("restore", tmp_path, "--include", "p1", "--include", "p2/etc", check=False)
    assert refused.returncode == 1 and b"several volumes (p1, p2)" in refused.stderr
    inside = backup.run("restore", backup.repo, "--include", "p2/etc", check=False)
    assert inside.returncode == 1 and b"is inside the repository" in inside.stderr
