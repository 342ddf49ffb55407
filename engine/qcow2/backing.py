"""Following backing links: from a tip image down to its base.

Resolution follows QEMU: a relative backing name is relative to the
directory of the image that names it (as that image's path was given, not
the current directory); the backing format comes from the header extension,
or is probed. Loops and absurd depths are refused before anything is read.

That is right for the inspection commands a user runs on their own files.
`import` runs as root into the repository, where a backing name is text
from whoever wrote the image: it passes a ``Confinement``, which reads
backing files only inside the tip's directory tree (and directories the
user allowed), regular files only, and never probes a format.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import ImageError, UsageError
from engine.qcow2.format import MAGIC, MAX_CHAIN_DEPTH
from engine.qcow2.layers import Layer, Qcow2Layer, RawLayer, open_layer

BACKING_FORMATS = ("qcow2", "raw")

_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def resolve_backing(image_path: str, backing_name: str) -> str:
    """The path a backing name designates, relative to the naming image."""
    m = _PROTOCOL.match(backing_name)
    if m:
        proto = m.group(1).lower()
        if proto == "file":
            backing_name = backing_name[len(m.group(0)) :]
        else:
            raise ImageError(
                image_path,
                f"backing file {backing_name!r} uses the {proto!r} protocol; "
                "backupfs follows plain file paths only",
            )
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


@dataclass(frozen=True)
class Confinement:
    """Where backing files may be read from, and the format of an unrecorded link.

    ``roots`` are real paths (no symlinks): the tip's directory first, then
    the directories the user allowed. A backing file is read only if the
    path it resolves to (symlinks followed, as the kernel would) lies under
    one of them; it is then opened one component at a time from that root
    without following any symlink, so a link swapped in meanwhile fails the
    open instead of leading elsewhere.

    Each root is opened once, here (``fds``), and every file is opened
    beneath that very directory: a root's path whose directory a user can
    rename (the tip in their home) cannot be swapped for a link to /etc
    between the check and the open. ``close`` releases them.
    """

    roots: tuple[str, ...]
    backing_format: str | None = None
    fds: tuple[int, ...] = ()
    # The filesystem no image may be read from: a mount's own (its daemon
    # reading its own FUSE files waits on itself), whatever path led there.
    forbidden_dev: int | None = None

    @classmethod
    def around(cls, tip: str, allow_outside: Sequence[str] = (), backing_format: str | None = None,
               forbidden_dev: int | None = None) -> Confinement:
        """The tip's directory tree plus ``allow_outside``; refuses a bad option value."""
        if backing_format is not None and backing_format not in BACKING_FORMATS:
            raise UsageError(f"--backing-format must be one of {', '.join(BACKING_FORMATS)}, not {backing_format!r}")
        roots = [os.path.realpath(os.path.dirname(os.path.abspath(tip)))]
        for d in allow_outside:
            real = os.path.realpath(d)
            if not os.path.isdir(real):
                raise UsageError(f"--allow-outside {d}: not a directory")
            roots.append(real)
        fds: list[int] = []
        try:
            for given, real in zip([tip, *allow_outside], roots):
                fds.append(_hold_dir(real, given))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(tuple(roots), backing_format, tuple(fds), forbidden_dev)

    def check_dev(self, fd: int, named_by: str, what: str) -> int:
        """``fd``, unless it lies on ``forbidden_dev`` (then closed, and refused)."""
        if self.forbidden_dev is not None and os.fstat(fd).st_dev == self.forbidden_dev:
            os.close(fd)
            raise ImageError(named_by, f"refused {what}: it lies on the repository's own mount (its daemon "
                                       "cannot read through itself); import it from where it is stored")
        return fd

    def close(self) -> None:
        """Release the roots' descriptors."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def open(self, path: str, named_by: str, backing_name: str) -> int:
        """A read-only descriptor of the regular file ``path``, if it lies inside.

        ``named_by`` and ``backing_name`` only make the refusal say which
        image asked for what.
        """
        if "\0" in path:
            raise ImageError(named_by, f"backing file name {backing_name!r} contains a NUL byte")
        real = os.path.realpath(path)
        index = next((i for i, r in enumerate(self.roots) if os.path.commonpath([real, r]) == r), None)
        root = None if index is None else self.roots[index]
        what = f"backing file {backing_name!r} ({path})"
        if root is None:
            via = "" if real == os.path.normpath(os.path.abspath(path)) else f", which leads to {real}"
            allowed = self.roots[0] if len(self.roots) == 1 else ", ".join(self.roots)
            raise ImageError(
                named_by,
                f"refused backing file {backing_name!r} ({path}{via}): it lies outside {allowed}; import reads "
                "backing files only inside the tip's directory tree (give --allow-outside DIR to allow another)",
            )
        try:
            assert index is not None and root is not None
            return self.check_dev(_open_beneath(self.fds[index], os.path.relpath(real, root)), named_by, what)
        except FileNotFoundError:
            raise ImageError(named_by, f"{what} not found") from None
        except _NotRegular as e:
            raise ImageError(named_by, f"refused {what}: it is {e}, not a regular file") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a component changed into a symlink
                raise ImageError(named_by, f"refused {what}: its path changed while it was opened") from None
            raise ImageError(named_by, f"{what}: {e.strerror}") from None


class _NotRegular(Exception):
    """What a backing path holds instead of a regular file."""


def _kind(mode: int) -> str:
    """A file type in words, for a refusal."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return words
    return "not a regular file"


def _hold_dir(real: str, given: str) -> int:
    """An O_PATH descriptor of the directory ``real`` (a real path just
    resolved): refused if the path led elsewhere by the time it was opened."""
    try:
        fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{given}: cannot open the directory {real}: {e.strerror}") from None
    if os.path.isdir("/proc/self/fd") and os.readlink(f"/proc/self/fd/{fd}") != real:
        os.close(fd)
        raise UsageError(f"{given}: the directory {real} changed while it was opened")
    return fd


def _open_beneath(root_fd: int, rel: str) -> int:
    """Open ``rel`` beneath the directory ``root_fd`` read-only, following no symlink on the way.

    Every component is opened with O_NOFOLLOW from the one before; the file
    is looked at (lstat) before it is opened, so a device or a FIFO is never
    opened, and again (fstat) after, with O_NONBLOCK so that a FIFO swapped
    in between cannot block the open.
    """
    parts = [p for p in rel.split(os.sep) if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _NotRegular("a directory")
    dir_fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        mode = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise _NotRegular(_kind(mode))
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _NotRegular(_kind(mode))
    return fd


def _open_tip(tip: str, dir_fd: int | None = None) -> int:
    """The tip the user named, read-only: itself, not what a symlink there
    points to; ``dir_fd``: its directory, as held by the confinement."""
    name = tip if dir_fd is None else os.path.basename(os.path.abspath(tip))
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ImageError(tip, "no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(tip, "is a symlink; give the image it points to") from None
        raise ImageError(tip, f"cannot open: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(tip, f"is {_kind(mode)}, not a regular file")
    return fd


def _tip_format(fd: int) -> str:
    """The tip's format from its first bytes: the file the user named, the
    one image whose format nothing else records."""
    return "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"


def _open_confined(path: str, fmt: str, fd: int) -> Layer:
    """A layer on a descriptor ``Confinement.open`` gave, in the format recorded for it.
    The layer owns ``fd`` from the start: a layer that fails to open closes it."""
    if fmt == "qcow2":
        return Qcow2Layer(path, fd)
    return RawLayer(path, fd)


def open_chain(
    tip: str,
    max_depth: int = MAX_CHAIN_DEPTH,
    *,
    confine: Confinement | None = None,
    tip_format: str | None = None,
    reopened: bool = False,
) -> list[Layer]:
    """Open ``tip`` and every backing file below it, tip first.

    ``confine``: read backing files only where it allows, in the format
    their link records (or its ``backing_format``), never probed.
    ``tip_format``: the tip's format if known (None probes the tip itself,
    a file the caller named). ``reopened``: with ``confine``, ``tip`` is an
    image of the confined chain opened again on its own (import rewrites
    each), found as a backing file is, not the file the user named (which
    is opened without following a symlink). On error every layer opened so far is closed
    again.
    """
    layers: list[Layer] = []
    seen: dict[tuple[int, int], str] = {}
    path: str | None = tip
    fmt: str | None = tip_format
    named_by = ""
    try:
        while path is not None:
            if len(layers) >= max_depth:
                raise ImageError(tip, f"backing chain is deeper than {max_depth} images")
            if confine is not None and layers:
                layer = _open_confined(path, fmt or "raw", confine.open(path, named_by, layers[-1].backing_file or ""))
            elif confine is not None and reopened:
                layer = _open_confined(path, tip_format or "raw",
                                       confine.open(path, tip, os.path.basename(tip)))
            elif confine is not None:
                fd = confine.check_dev(_open_tip(tip, confine.fds[0] if confine.fds else None), tip,
                                       f"the chain's tip {tip}")
                layer = _open_confined(path, tip_format or _tip_format(fd), fd)
            else:
                layer = open_layer(path, fmt)
            layers.append(layer)
            st = os.fstat(layer.fd)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ImageError(path, f"backing chain loops back to {seen[key]}")
            seen[key] = path
            if layer.backing_file is None:
                break
            fmt = layer.backing_format
            if fmt is not None and fmt not in BACKING_FORMATS:
                raise ImageError(
                    path, f"backing file format {fmt!r} is not supported (qcow2 and raw are)"
                )
            next_path = resolve_backing(path, layer.backing_file)
            if confine is not None:
                fmt = fmt or confine.backing_format
                if fmt is None:
                    raise ImageError(
                        path, f"backing file {layer.backing_file!r} has no format recorded in this image; "
                        "give --backing-format raw or qcow2 (backupfs does not guess a format)")
                named_by = path
                path = next_path
                continue
            try:
                if stat.S_ISDIR(os.stat(next_path).st_mode):
                    raise ImageError(path, f"backing file {layer.backing_file!r} ({next_path}) is a directory")
            except FileNotFoundError:
                raise ImageError(path, f"backing file {layer.backing_file!r} not found ({next_path})") from None
            except ValueError:
                raise ImageError(path, f"backing file name {layer.backing_file!r} contains a NUL byte") from None
            except OSError as e:  # a symlink loop, a directory without search permission...
                raise ImageError(path, f"backing file {layer.backing_file!r} ({next_path}): {e.strerror}") from None
            path = next_path
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return layers
