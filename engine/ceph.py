"""Naming an RBD image and reaching its Ceph cluster.

A device's source may be an RBD image, named ``rbd:POOL/IMAGE`` or
``rbd:POOL/NAMESPACE/IMAGE``, with the cluster's configuration file and the
client to connect as (``--ceph-conf``, ``--ceph-id``; defaults as the rbd
CLI's: ``CEPH_CONF``, then /etc/ceph/ceph.conf, and librados' own client).

librados and librbd come from Debian's python3-rados and python3-rbd (no
wheels exist); without them an rbd: source is one line saying what to
install, and nothing else of backupfs needs them (they are imported here,
on first use, and nowhere else).

Every call that reaches the cluster is bounded in time: a cluster that
does not answer gives an error within ``timeout()`` seconds, never a hang
(librados' defaults wait forever for a monitor).
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from engine.errors import ErrnoError
from engine.stopsignals import no_stops_in_new_threads
from engine.text import escape

PREFIX = "rbd:"
DEFAULT_CONF = "/etc/ceph/ceph.conf"
# Seconds a monitor or OSD may take to answer before the call fails
# (client_mount_timeout, rados_mon_op_timeout, rados_osd_op_timeout).
DEFAULT_TIMEOUT = 30.0
# librbd's requests in flight for one management call: ``diff_iterate``
# asks each changed RADOS object what changed in it, ten at a time by
# librbd's default. At 64, RBD's answer for 1 % of a 1 GiB image came in
# 9 ms instead of 15 (measured on the suite's cluster). Raised only from
# that default: a value the cluster's configuration sets is kept.
MANAGEMENT_OPS = 64
LIBRBD_DEFAULT_MANAGEMENT_OPS = 10
# What pool, namespace and image names may hold here: Ceph allows more, but
# these are printed, put in snapshot names and stored; no '/', '@' or
# control character can then change what a name means.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_CLIENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

_modules: tuple[ModuleType, ModuleType] | None = None
_modules_lock = threading.Lock()


class CephError(ErrnoError):
    """An RBD source cannot be named, reached or used; the message is one line."""


def is_rbd(source: str | None) -> bool:
    """Whether a device source names an RBD image."""
    return bool(source) and str(source).startswith(PREFIX)


def timeout() -> float:
    """Seconds any one call to the cluster may take (BACKUPFS_CEPH_TIMEOUT overrides)."""
    text = os.environ.get("BACKUPFS_CEPH_TIMEOUT")
    if text:
        try:
            value = float(text)
            if 0 < value <= 3600:
                return value
        except ValueError:
            pass
    return DEFAULT_TIMEOUT


def bindings() -> tuple[ModuleType, ModuleType]:
    """(rados, rbd), or a CephError that says what to install."""
    global _modules
    with _modules_lock:
        if _modules is None:
            try:
                import rados
                import rbd
            except ImportError:
                raise CephError(
                    "rbd: sources need Ceph's Python bindings, which this Python cannot import: "
                    "apt-get install python3-rbd python3-rados, then run ./scripts/install again "
                    "(it links them into backupfs's environment)", errno.ENOSYS) from None
            _modules = (rados, rbd)
        return _modules


@dataclass(frozen=True)
class RbdSpec:
    """An RBD image and how to reach its cluster."""

    pool: str
    namespace: str  # "" is the pool's default namespace
    image: str
    conf: str  # absolute path of the ceph.conf to read
    client: str | None = None  # the client id (--ceph-id); None: librados' default

    @property
    def source(self) -> str:
        """The canonical name, as the catalog keeps it: rbd:POOL[/NAMESPACE]/IMAGE."""
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{PREFIX}{self.pool}/{ns}{self.image}"

    def options(self) -> str:
        """What the catalog keeps beside the name: the conf file and client (JSON)."""
        return json.dumps({"conf": self.conf, "client": self.client}, sort_keys=True)

    def __str__(self) -> str:
        return self.source


def parse(source: str, conf: str | None = None, client: str | None = None) -> RbdSpec:
    """The spec named by ``source`` (rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE).

    ``conf`` None: CEPH_CONF, then /etc/ceph/ceph.conf, made absolute now, so
    that a mount started later (another environment) reaches the same cluster.
    """
    if not is_rbd(source):
        raise CephError(f"{escape(source)} is not an RBD image name (rbd:POOL/IMAGE)", errno.EINVAL)
    parts = source[len(PREFIX):].split("/")
    if len(parts) not in (2, 3):
        raise CephError(f"{escape(source)}: an RBD image is named rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE",
                        errno.EINVAL)
    for part in parts:
        if not _NAME_RE.fullmatch(part):
            raise CephError(f"{escape(source)}: {escape(part)!s} is not a pool, namespace or image name backupfs "
                            "takes (letters, digits, '_', '.', '+', '-'; at most 128)", errno.EINVAL)
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else ""
    if client is not None and not _CLIENT_RE.fullmatch(client):
        raise CephError(f"--ceph-id {escape(client)}: not a Ceph client id (letters, digits, '_', '.', '-')",
                        errno.EINVAL)
    if conf is None:
        conf = os.environ.get("CEPH_CONF") or DEFAULT_CONF
    conf = os.path.abspath(conf)
    if "\0" in conf or "\n" in conf:
        raise CephError("--ceph-conf: the path holds a control character", errno.EINVAL)
    return RbdSpec(pool, namespace, image, conf, client)


def from_record(source: str, options: str | None) -> RbdSpec:
    """The spec of a device as the catalog keeps it (``options``: see RbdSpec.options)."""
    try:
        held: Any = json.loads(options) if options else {}
    except ValueError:
        held = None
    if not isinstance(held, dict):
        # backupfs writes an object (RbdSpec.options): anything else was made
        # by hand, and taking it as "no options" would reach another cluster.
        raise CephError(f"{escape(source)}: its Ceph options {escape(str(options)[:80])} are not the JSON object "
                        "backupfs writes", errno.EINVAL)
    conf = held.get("conf") if isinstance(held.get("conf"), str) else None
    client = held.get("client") if isinstance(held.get("client"), str) else None
    return parse(source, conf, client)


def describe_error(e: BaseException) -> tuple[str, int]:
    """(words, errno) of a librados/librbd exception."""
    code = getattr(e, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    text = str(e).strip()
    # librados' messages end with the C error in brackets: keep them short.
    text = text.splitlines()[0] if text else os.strerror(code)
    # librbd's end with what failed in Python bytes reprs, "(error removing
    # snapshot b'x' from b'y')": our own message says what was being done.
    text = re.sub(r"\s*\(error [^()]*\)$", "", text) or os.strerror(code)
    return text, code


class Cluster:
    """A connection to one cluster and a pool's I/O context in it.

    Opened per user of an image (a device, a restore, a probe) and closed
    by it: a connection costs milliseconds, and one per user means one
    user's shutdown cannot pull an image out from under another.
    """

    def __init__(self, spec: RbdSpec) -> None:
        # librados starts its threads here: started with the stop signals
        # blocked (they inherit this thread's mask), they never take a
        # Ctrl-C or SIGTERM meant for the main thread, which holds stops
        # back where a stop must not land (engine/stopsignals.py).
        with no_stops_in_new_threads():
            self._connect(spec)

    def _connect(self, spec: RbdSpec) -> None:
        rados, _ = bindings()
        self.spec = spec
        if not os.path.isfile(spec.conf):
            raise CephError(f"{spec.source}: no Ceph configuration at {escape(spec.conf)} "
                            "(give --ceph-conf FILE, or set CEPH_CONF)", errno.ENOENT)
        limit = timeout()
        try:
            kwargs: dict[str, Any] = {"conffile": spec.conf}
            if spec.client:
                kwargs["rados_id"] = spec.client
            self.rados = rados.Rados(**kwargs)
            for key in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
                self.rados.conf_set(key, str(int(max(1, limit))))
            if self.rados.conf_get("rbd_concurrent_management_ops") == str(LIBRBD_DEFAULT_MANAGEMENT_OPS):
                self.rados.conf_set("rbd_concurrent_management_ops", str(MANAGEMENT_OPS))
        except rados.Error as e:
            text, code = describe_error(e)
            raise CephError(f"{spec.source}: cannot read the Ceph configuration {escape(spec.conf)}: "
                            f"{text}", code) from None
        try:
            self.rados.connect()
        except rados.Error as e:
            self.rados.shutdown()
            text, code = describe_error(e)
            if code in (errno.ETIMEDOUT, errno.EINTR):
                text = f"no monitor answered within {limit:g} s"
            raise CephError(f"{spec.source}: cannot reach the Ceph cluster of {escape(spec.conf)}: {text}",
                            code) from None
        try:
            self.ioctx = self.rados.open_ioctx(spec.pool)
            if spec.namespace:
                self.ioctx.set_namespace(spec.namespace)
        except rados.ObjectNotFound:
            self.rados.shutdown()
            raise CephError(f"{spec.source}: the cluster has no pool {spec.pool!r}", errno.ENOENT) from None
        except rados.Error as e:
            self.rados.shutdown()
            text, code = describe_error(e)
            raise CephError(f"{spec.source}: cannot open pool {spec.pool!r}: {text}", code) from None

        # Images opened on this connection (engine/rbdimage.py): closed before
        # it is, since librbd crashes the process on an image whose cluster
        # handle was shut down under it.
        self.images: set[Any] = set()

    def close(self) -> None:
        for image in list(self.images):
            image.close()
        try:
            self.ioctx.close()
        finally:
            self.rados.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
