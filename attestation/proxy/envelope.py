"""The OpenAI error envelope the proxy answers with when it, not the enclave, decides the response."""

from __future__ import annotations

import json


class ProxyError(Exception):
    """A response of the proxy's own: HTTP status, OpenAI error ``code`` and ``type``, and a message for people.

    ``close``: the connection cannot be reused afterwards (e.g. a request body that was not read).
    """

    def __init__(self, status: int, code: str, message: str, *, error_type: str = "api_error",
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.error_type = error_type
        self.close = close

    def body(self) -> bytes:
        return envelope(self.message, self.code, self.error_type)


def envelope(message: str, code: str, error_type: str = "api_error") -> bytes:
    """``{"error": {"message", "type", "param": null, "code"}}`` as JSON bytes."""
    doc = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return json.dumps(doc).encode()


def bad_request(message: str, *, status: int = 400, code: str = "invalid_request") -> ProxyError:
    """A client error found by the proxy itself; the connection is closed after it (its state is unknown)."""
    return ProxyError(status, code, message, error_type="invalid_request_error", close=True)
