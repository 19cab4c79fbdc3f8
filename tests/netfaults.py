"""A loopback TCP proxy that the fault tests put between a worker and a real server (the S3
endpoint), to make that server unreachable or hung on cue without touching our code.

Modes:
- "up": connections are forwarded;
- "down": open connections are cut and new ones closed at once (the server is unreachable);
- "hang": new connections are accepted and never answered (a stuck network call).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

Mode = Literal["up", "down", "hang"]


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode: Mode = "up"
        self.refused = 0  # connections closed or held while not "up"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            self.mode = mode
            if mode != "up":  # cut pooled keep-alive connections too
                for sock in self._open:
                    _close(sock)
                self._open.clear()

    def close(self) -> None:
        self._closed.set()
        _close(self.listener)
        self.set_mode("down")

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode != "up":
                    self.refused += 1
                if mode == "down":
                    _close(client)
                    continue
                self._open.append(client)
            if mode == "hang":
                continue  # held open, never answered, until the mode changes
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
