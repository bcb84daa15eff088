"""The relay's control socket: drain, resume, add, remove and list targets of a running relay.

A Unix stream socket, created owner-only (0600, under a 0077 umask so it never exists with wider rights) and
answering only processes of the same user (or root), checked with SO_PEERCRED. One JSON request line, one JSON
answer line: ``{"op": "drain", "target": "tcp:10.0.0.3:8443", "wait": 30}`` ->
``{"ok": true, "targets": [...], "open": 0}``. Operations: ``status``, ``drain`` (``wait``: seconds to wait for
its open connections to finish), ``resume``, ``add``, ``remove`` (a drained target with no open connection).

The relay is host software with no secret: this socket guards the availability of the service, not its
confidentiality (the client verifies whichever replica it reaches).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from .relay import Relay, RelayError

log = logging.getLogger("cube.host.relay")

MAX_REQUEST_BYTES = 4096
MAX_WAIT_SECONDS = 3600.0
OPERATIONS = ("status", "drain", "resume", "add", "remove")


class ControlError(Exception):
    """The control socket cannot be set up or reached, or refused a request."""


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on (a relay that died); refuse anything else at that path."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    finally:
        probe.close()
    raise ControlError(f"{path}: another relay is listening there")


class ControlServer:
    """Serves one relay's control requests on a Unix socket."""

    def __init__(self, relay: Relay, path: Path) -> None:
        self.relay = relay
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST_BYTES + 1)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else None
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
            except asyncio.TimeoutError:
                line = None
            except ValueError:  # longer than the reader's limit
                line = b""
            if uid is None or uid not in (os.geteuid(), 0):
                log.warning("relay control: refused a peer of uid %s", uid)
                answer: dict[str, Any] = {"ok": False, "error": "not allowed"}
            elif line is None:
                answer = {"ok": False, "error": "no request within 10 s"}
            else:
                answer = await self.handle(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes) -> dict[str, Any]:
        """Decode one request line and act on it; the answer (never raises for a bad request)."""
        if len(line) > MAX_REQUEST_BYTES or not line.endswith(b"\n"):
            return {"ok": False, "error": "request must be one JSON line"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or request.get("op") not in OPERATIONS:
            return {"ok": False, "error": f"op must be one of {', '.join(OPERATIONS)}"}
        op, target = request["op"], request.get("target")
        relay = self.relay
        try:
            answer: dict[str, Any] = {"ok": True}
            if op != "status":
                if not isinstance(target, str):
                    return {"ok": False, "error": f"{op} needs a target"}
                log.warning("relay control: %s %s", op, target)
            if op == "drain":
                wait = request.get("wait", 0)   # checked first: a refused request changes nothing
                if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_SECONDS:
                    return {"ok": False, "error": f"wait must be 0..{MAX_WAIT_SECONDS:g} seconds"}
                relay.drain(target)
                answer["open"] = await relay.wait_drained(target, float(wait))
            elif op == "resume":
                relay.resume(target)
            elif op == "add":
                relay.add_target(target)
            elif op == "remove":
                relay.remove_target(target)
        except RelayError as exc:
            return {"ok": False, "error": str(exc)}
        answer["targets"] = relay.targets_status()
        return answer


def control_request(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a relay's control socket and return its answer (ControlError when unreachable)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout + float(request.get("wait", 0) or 0))
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ControlError(f"relay control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"relay control socket {path}: not a relay's answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"relay control socket {path}: not a relay's answer")
    return answer
