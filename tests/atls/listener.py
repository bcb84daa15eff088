"""A loopback TCP listener serving each connection in a thread: the base of the test adversaries' servers."""

from __future__ import annotations

import socket
import threading

from .conftest import bind_loopback


class LoopbackListener:
    """Accepts on 127.0.0.1 and hands each connection to ``_serve``; counts connections, keeps what is recorded.

    Subclasses set up everything ``_serve`` needs before calling ``super().__init__`` (accepting starts there).
    """

    def __init__(self, *, port: int = 0) -> None:
        self.recorded = bytearray()
        self.connections = 0
        self.handshakes = 0
        self._lock = threading.Lock()
        self._listener = bind_loopback(port)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
