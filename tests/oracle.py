"""QEMU as the oracle.

Every image we read or write is checked against what qemu-img and qemu-io
say about it; these helpers run them and turn their answers into Python.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest


def run(*cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    """Run a command; fail the test with its stderr if it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def qemu_img(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    return run("qemu-img", *args, cwd=cwd)


def qemu_io(image: str | os.PathLike[str], *commands: str, fmt: str = "qcow2") -> str:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, str(image))
    if "error" in out.lower() or "failed" in out.lower():
        pytest.fail(f"qemu-io reported a failure: {out}")
    return out


def qemu_raw(image: str | os.PathLike[str], scratch: Path) -> bytes:
    """The disk as QEMU reconstructs it (`qemu-img convert -O raw`)."""
    out = scratch / f"qemu-raw-{os.getpid()}-{Path(image).name}.raw"
    try:
        qemu_img("convert", "-O", "raw", str(image), str(out))
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def qemu_map(image: str | os.PathLike[str]) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", str(image)))


def normalize_map(entries: list[dict]) -> list[tuple]:
    """Map entries as comparable tuples, merged where all fields agree.

    "compressed" is dropped: QEMU 7.2 does not report it. An offset is kept
    only where data is read from it: QEMU also prints the host cluster of
    zero or unallocated subclusters, which says nothing about the content.
    """
    out: list[list] = []
    for e in entries:
        offset = e.get("offset") if e["data"] else None
        row = [e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"], offset]
        if out:
            last = out[-1]
            same = last[2:6] == row[2:6]
            contiguous = (last[6] is None and row[6] is None) or (
                last[6] is not None and row[6] is not None and last[6] + last[1] == row[6]
            )
            if same and contiguous and last[0] + last[1] == row[0]:
                last[1] += row[1]
                continue
        out.append(row)
    return [tuple(r) for r in out]


def qemu_check(image: str | os.PathLike[str]) -> str:
    """`qemu-img check`, asserting no errors and no leaks."""
    proc = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"qemu-img check failed ({proc.returncode}):\n{text}"
    assert "No errors were found" in text, text
    assert "leaked" not in text.lower(), text
    return text


def qemu_compare(a: str | os.PathLike[str], b: str | os.PathLike[str], fmt_b: str = "raw") -> None:
    """`qemu-img compare` of contents, and equal virtual sizes.

    (Not -s: strict mode also compares allocation, which differs by design
    between a qcow2 and a raw file with the same bytes.)
    """
    proc = subprocess.run(
        ["qemu-img", "compare", "-F", fmt_b, str(a), str(b)], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"qemu-img compare {a} {b}: {proc.stdout}{proc.stderr}"
    sizes = [json.loads(qemu_img("info", "--output=json", str(p)))["virtual-size"] for p in (a, b)]
    assert sizes[0] == sizes[1], f"virtual sizes differ: {a} {sizes[0]}, {b} {sizes[1]}"
