"""The pread floor (bench/pread_floor.c): compile it, and give it a tip's pieces.

Shared by bench/chain_read.py and bench/fuse_vs_qemu.py. The pieces come
from `qemu-img map` and `qemu-img info --backing-chain`, so the floor
reads what QEMU says the tip is made of, with none of our code involved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pread_floor.c")


def build(workdir: str) -> str | None:
    """The compiled floor in ``workdir``; None (and why, printed) when it cannot be built."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("floor: no C compiler here, the floor is left out")
        return None
    exe = os.path.join(workdir, "pread_floor")
    done = subprocess.run([cc, "-O2", "-o", exe, SOURCE], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"floor: compiling {SOURCE} failed, the floor is left out:\n{done.stderr}")
        return None
    return exe


def argv(exe: str, tip: str, workdir: str, name: str, chunk: int = 1 << 20) -> list[str] | None:
    """The floor's command line for reading ``tip``; None if a piece is not a plain pread."""
    chain = json.loads(subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", tip],
        check=True, capture_output=True, text=True).stdout)
    entries = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", tip], check=True, capture_output=True, text=True).stdout)
    path = os.path.join(workdir, f"floor-{name}.txt")
    with open(path, "w") as out:
        for e in entries:
            if e["data"] and ("offset" not in e or e.get("compressed", False)):
                return None  # compressed: not a plain pread
            out.write(f"{e['start']} {e['length']} {e['depth']} {int(bool(e['data']))} "
                      f"{e.get('offset', 0)}\n")
    return [exe, str(chunk), path] + [c["filename"] for c in chain]


def run(command: list[str]) -> float:
    """Seconds of the floor's whole-disk pass (timed inside it: no exec, no parsing)."""
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.strip())
