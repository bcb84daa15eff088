"""Serve an ASGI app with uvicorn on a real loopback socket, in a background thread.

The fakes need three things a mocked transport cannot give: a real TCP port (so the code under test
runs its own httpx connection pool, timeouts and keep-alive), the ability to stop answering (the
port then refuses connections, exactly as when a backend process dies), and the ability to come
back on the *same* port (as a restarted backend does, so the configured base_url stays valid).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

LOOPBACK = "127.0.0.1"


class _QuietConfig(uvicorn.Config):
    """A uvicorn Config that leaves the process-wide logging set-up alone.

    uvicorn's own ``configure_logging`` runs ``dictConfig`` and, with ``access_log=False``, strips the
    ``uvicorn.access`` logger's handlers for the whole process, which would silently break the access logs of the
    service under test running in the same process.
    """

    def configure_logging(self) -> None:
        return None


class LoopbackServer:
    """uvicorn in a daemon thread on 127.0.0.1; the port is chosen by the OS once and then kept."""

    def __init__(self, app: Any, *, name: str = "fake") -> None:
        self._app = app
        self._name = name
        self._port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        if not self._port:
            raise RuntimeError(f"{self._name} has never been started")
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR lets a restart take the same port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, self._port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        return sock

    def start(self) -> str:
        """Start serving (idempotent) and return the base URL, e.g. ``http://127.0.0.1:41234``."""
        with self._lock:
            if self._server is not None:
                return self.base_url
            sock = self._bind()
            config = _QuietConfig(self._app, lifespan="off", loop="asyncio")
            server = uvicorn.Server(config)
            loop_box: list[asyncio.AbstractEventLoop] = []
            stop_box: list[asyncio.Event] = []
            thread = threading.Thread(
                target=self._run, args=(server, sock, loop_box, stop_box), name=f"{self._name}-{self._port}",
                daemon=True,
            )
            thread.start()
            deadline = time.monotonic() + 10
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError(f"{self._name} failed to start on port {self._port}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self._name} did not start within 10 s")
                time.sleep(0.002)
            self._server, self._thread = server, thread
            self._loop, self._stop_event = loop_box[0], stop_box[0]
            return self.base_url

    @staticmethod
    def _run(server: uvicorn.Server, sock: socket.socket, loop_box: list, stop_box: list) -> None:
        """uvicorn's startup, then wait for stop() and tear down at once.

        ``Server.serve()`` would poll for exit every 0.1 s and then linger 0.1 s more; fakes are started and
        stopped many times per test run, so they skip that and close everything immediately.
        """

        async def serve() -> None:
            stop = asyncio.Event()
            loop_box.append(asyncio.get_running_loop())
            stop_box.append(stop)
            config = server.config
            if not config.loaded:
                config.load()
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            await server.on_tick(0)  # sets the default response headers (Date, Server)
            await stop.wait()
            for listener in server.servers:
                listener.close()
            # Drop every connection, busy or idle, as a dying backend process does.
            for connection in list(server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            for task in list(server.server_state.tasks):
                task.cancel()
            await asyncio.sleep(0)

        try:
            asyncio.run(serve())
        finally:
            sock.close()

    def close_connection(self, client: tuple[str, int]) -> bool:
        """Close (FIN after what is already written) the connection from ``client``; call on the server's loop.

        What a killed backend process leaves on the wire: the kernel flushes and closes its sockets, so the peer
        reads the bytes written so far and then EOF — in the middle of a chunked body, without its last chunk.
        """
        server = self._server
        if server is None:
            return False
        for connection in list(server.server_state.connections):
            if tuple(getattr(connection, "client", None) or ()) == tuple(client):
                connection.transport.close()
                return True
        return False

    def stop(self) -> None:
        """Close the listening socket and every open connection; later connects are refused."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            if server is None or thread is None:
                return
            self._loop.call_soon_threadsafe(self._stop_event.set)
            thread.join(timeout=10)
            if thread.is_alive():
                raise RuntimeError(f"{self._name} did not stop within 10 s")
