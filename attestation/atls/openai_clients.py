"""openai-python clients whose every connection is attested TLS, and whose WebSocket features fail closed.

openai-python sends HTTP through the ``http_client`` it is given (here an attested one), but its WebSocket
features (``realtime.connect()``, the Responses WebSocket mode, live sessions and forks, realtime
translations, ``beta.realtime``, ...) open their own connection with the ``websockets`` library: TLS checked
by WebPKI only, carrying ``Authorization: Bearer <PAT>``. The host serves the enclave's address, so it can
get a publicly trusted certificate for the name and would receive the PAT. These clients refuse every such
path before a connection is opened, at the client methods each of them calls to build its URL (the
WebSocket query, the ``ws(s)://`` URL); they refuse ``websocket_base_url`` and any ``http_client`` that is
not attested; copies (``copy``/``with_options``) are built as the same class, so they refuse the same.

``receipt(request_id)`` fetches the signed receipt of a response the client got (``attestation.receipt``).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import openai

from ..errors import AttestationError
from ..receipt import Receipt, parse_receipt
from .client import AsyncAttestedClient, AttestedClient, NotAttestedError

WEBSOCKET_REFUSAL = (
    "openai-python's WebSocket features (realtime, Responses WebSocket mode, live, translations) open a "
    "connection of their own that is not attested TLS and would carry your PAT: the attested client does not "
    "support them; use the HTTP endpoints"
)
_UNATTESTED_OPTIONS = ("websocket_base_url", "provider", "workload_identity", "data_residency")
_WEBSOCKET_SCHEMES = ("ws", "wss")
_HOOKS = ("_websocket_query_params", "_websocket_query_params_fallback", "_prepare_url")


class APIKeyError(AttestationError, ValueError):
    """An api_key that cannot be a Cube AI PAT (refused before it reaches an HTTP header)."""


def check_api_key(api_key: object) -> None:
    """Refuse a key that is not a PAT-shaped token: printable ASCII, no spaces, not empty.

    A non-ASCII placeholder left in (``"cube_pat_…"``) would otherwise die as a raw UnicodeEncodeError
    deep inside httpx. The key itself is never echoed; only where and what the bad character is.
    """
    hint = "api_key must be the Cube AI PAT (cube_pat_...) printed at bootstrap or made with `cube-admin pats create`"
    if not isinstance(api_key, str):
        raise APIKeyError(f"{hint}: got {type(api_key).__name__}, not a string")
    if not api_key:
        raise APIKeyError(f"{hint}: got an empty string")
    for position, char in enumerate(api_key):
        if not "!" <= char <= "~":
            what = "whitespace (strip the newline?)" if char.isspace() else f"U+{ord(char):04X}"
            extra = " (a placeholder such as '…' left in?)" if not char.isascii() else ""
            raise APIKeyError(f"{hint}: character {position} is {what}{extra}; a PAT is printable ASCII")


class _AttestedOnly:
    """What both openai clients add: refuse unattested options, bad keys, and every WebSocket path."""

    _http_client_type: type
    _openai_class: type

    def __init__(self, *, api_key: Any = None, http_client: Any = None, **options: Any) -> None:
        if missing := [hook for hook in _HOOKS if not hasattr(self._openai_class, hook)]:
            raise NotAttestedError(f"openai {openai.__version__} no longer has {', '.join(missing)}, where its "
                                   "WebSocket paths are closed: refusing to build a client that might open them")
        for name in _UNATTESTED_OPTIONS:
            if options.get(name) is not None:
                raise NotAttestedError(f"{name}= is not supported by the attested client: it would send "
                                       "credentials on a connection that is not attested TLS")
        if not isinstance(http_client, self._http_client_type):
            raise NotAttestedError(f"http_client must be an {self._http_client_type.__name__} (got "
                                   f"{type(http_client).__name__}): any other client is not attested TLS")
        check_api_key(api_key)
        super().__init__(api_key=api_key, http_client=http_client, **options)  # type: ignore[call-arg]

    # Every WebSocket connect of openai-python builds its query here (and falls back to the second name).
    def _websocket_query_params(self, url: Any, extra_query: Any) -> Any:
        raise NotAttestedError(WEBSOCKET_REFUSAL)

    def _websocket_query_params_fallback(self, url: Any, extra_query: Any) -> Any:
        raise NotAttestedError(WEBSOCKET_REFUSAL)

    def _prepare_url(self, url: str) -> Any:
        prepared = super()._prepare_url(url)  # type: ignore[misc]
        if prepared.scheme in _WEBSOCKET_SCHEMES:
            raise NotAttestedError(WEBSOCKET_REFUSAL)
        return prepared


_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _receipt_route(request_id: str) -> str:
    """Relative to the client's base URL (``https://<enclave>/proxy/<domain>/v1``)."""
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("request_id must be a response's x-request-id (letters, digits, - and _)")
    return f"/receipts/{request_id}"


class AttestedOpenAI(_AttestedOnly, openai.OpenAI):
    """``openai.OpenAI`` over an :class:`AttestedClient`; WebSocket features raise NotAttestedError."""

    _http_client_type = AttestedClient
    _openai_class = openai.OpenAI

    def receipt(self, request_id: str) -> Receipt:
        """The signed receipt of a response this key received, by its ``x-request-id`` (``completion._request_id``,
        or ``stream.response.headers["x-request-id"]``); check it with ``attestation.receipt.verify_receipt``.
        openai's ``NotFoundError`` when there is none for this key."""
        return parse_receipt(self.get(_receipt_route(request_id), cast_to=httpx.Response).content)


class AsyncAttestedOpenAI(_AttestedOnly, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` over an :class:`AsyncAttestedClient`; WebSocket features raise NotAttestedError."""

    _http_client_type = AsyncAttestedClient
    _openai_class = openai.AsyncOpenAI

    async def receipt(self, request_id: str) -> Receipt:
        """As :meth:`AttestedOpenAI.receipt`."""
        response = await self.get(_receipt_route(request_id), cast_to=httpx.Response)
        return parse_receipt(response.content)
