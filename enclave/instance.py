"""One enclave per data directory and port, claimed before anything is written.

A second ``cube-enclave serve`` on the same data directory or port must fail without touching the running
instance's files (its certificate PEM, policy, store): ``claim`` takes an exclusive lock on the data directory
and binds the listening socket first, and the caller writes nothing until both are held.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE_NAME = "enclave.lock"


class InstanceError(Exception):
    """Another instance holds the data directory or the port; the message says which."""


@dataclass
class Instance:
    """The held claim: the data directory lock and the bound, listening socket (handed to uvicorn)."""
    lock_fd: int
    socket: socket.socket

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def release(self) -> None:
        self.socket.close()
        os.close(self.lock_fd)


def _lock(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InstanceError(f"another cube-enclave is running on the data directory {data_dir}; stop it first "
                            "or pass another --data-dir") from None
    return fd


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                        flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InstanceError(f"cannot listen on {host}:{port}: {e.strerror} (another instance, or pass "
                            "another --port)") from None
    sock.set_inheritable(False)
    return sock


def claim(data_dir: Path, host: str, port: int) -> Instance:
    """Lock ``data_dir`` and bind ``host:port``, or raise InstanceError having changed nothing but the lock file."""
    fd = _lock(data_dir)
    try:
        return Instance(lock_fd=fd, socket=_listen(host, port))
    except BaseException:
        os.close(fd)
        raise
