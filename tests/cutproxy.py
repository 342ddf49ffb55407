"""A TCP forwarder that cuts the network after a number of bytes: a real cut between
boto3 and radosgw, for a push interrupted by the network rather than by a signal.

``CutProxy(target, budget, mode)`` listens on 127.0.0.1 and forwards each
connection to ``target``. Once ``budget`` bytes have gone from clients to the
server (the request bodies: what a push sends), it cuts:

* ``reset``: every connection is closed with a TCP reset (SO_LINGER 0), and
  each new one is accepted and reset at once;
* ``stall``: nothing more is forwarded either way and the connections are
  held open, new ones too (accepted, never read): an endpoint that stopped
  answering without closing anything.

Threads wait in select() with a short timeout so that a cut or ``close``
reaches them; no byte is delayed by it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

MODES = ("reset", "stall")


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class CutProxy:
    def __init__(self, target: tuple[str, int], budget: int, mode: str, counting: str = "to_server") -> None:
        """``counting``: which way the budget's bytes go: ``to_server`` (what a push
        sends) or ``to_client`` (what a reader is sent: the cut lands mid-answer)."""
        assert mode in MODES and counting in ("to_server", "to_client")
        self.counting = counting
        self.target = target
        self.budget = budget
        self.mode = mode
        self.forwarded = 0  # bytes from clients to the server
        self.cut = threading.Event()
        self._closed = threading.Event()
        self._mutex = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._start(self._accept)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            if not select.select([self.server], [], [], 0.1)[0]:
                continue
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut.is_set():
                if self.mode == "reset":
                    _reset(client)
                else:
                    self._socks.append(client)  # held, never read
                continue
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            self._socks += [client, upstream]
            self._start(self._pipe, client, upstream, True)
            self._start(self._pipe, upstream, client, False)

    def _pipe(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while not self._closed.is_set():
                if self.cut.is_set():
                    if self.mode == "reset":
                        _reset(src)
                        _reset(dst)
                    else:
                        self._closed.wait()  # stalled: the connection stays open, silent
                    return
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if to_server == (self.counting == "to_server"):
                    with self._mutex:
                        room = max(self.budget - self.forwarded, 0)
                        if len(data) >= room:
                            data = data[:room]
                            self.cut.set()
                        self.forwarded += len(data)
                if data:
                    dst.sendall(data)
        except OSError:
            pass  # the other side closed or was reset

    def close(self) -> None:
        self._closed.set()
        for t in self._threads:
            t.join(5)
        for s in [self.server, *self._socks]:
            try:
                s.close()
            except OSError:
                pass
