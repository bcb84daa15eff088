"""Backend configuration, the registry's model card, and the driver interface with its HTTP plumbing."""

from __future__ import annotations

import asyncio
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from enclave.backends.errors import BackendUnavailable, InvalidModelName, UnsupportedOperation

#: Largest discovery body accepted from a backend; beyond it the backend is treated as malformed.
MAX_DISCOVERY_BYTES = 8 * 1024 * 1024
#: Longest backend text quoted in an error reason.
MAX_QUOTED = 200

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Model names as Ollama and vLLM accept them in practice: no whitespace or control characters, bounded.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,349}$")


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model) or "//" in model:
        raise InvalidModelName(str(model))
    return model


def plain_http_base_url(value: str) -> str:
    """An http(s) base URL with a host and nothing else (no credentials, query or fragment), without a
    trailing slash; ValueError saying what is wrong otherwise (for pydantic validators)."""
    try:
        url = httpx.URL(value)
    except Exception as exc:  # httpx.InvalidURL and friends
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not url.host:
        raise ValueError("has no host")
    if url.userinfo:
        raise ValueError("must not carry credentials (a backend's token goes in api_key)")
    if url.query or url.fragment:
        raise ValueError("must not have a query or fragment")
    return str(url).rstrip("/")


class BackendConfig(BaseModel):
    """One LLM backend as listed in the enclave configuration.

    ``priority`` decides which backend serves a model id that several backends offer (highest wins; see
    ``enclave.registry``). ``read_timeout`` bounds each read of a discovery or delete call, ``pull_timeout``
    the longest silence tolerated while a pull streams progress (verifying a large blob can take minutes).

    Inference (``enclave.inference``): a stream has no total time limit, only ``connect_timeout``,
    ``first_byte_timeout`` (until the response headers: a non-streamed answer is generated before them) and
    ``idle_timeout`` (the longest silence between stream events); the defaults suit slow CPU generation. At
    most ``max_in_flight`` requests run on the backend at once; up to ``max_queued`` more wait, each at most
    ``queue_timeout`` seconds, and beyond that a request is refused (503 ``backend_overloaded``).
    ``cache_salt`` (vLLM only) sets vLLM's ``cache_salt`` per domain, so one tenant cannot probe another's
    prefix cache by timing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="unique; letters, digits, '.', '_' and '-'")
    kind: Literal["ollama", "vllm"]
    base_url: str
    api_key: SecretStr | None = None
    connect_timeout: float = Field(2.0, gt=0, le=600)
    read_timeout: float = Field(10.0, gt=0, le=3600)
    pull_timeout: float = Field(3600.0, gt=0, le=7 * 24 * 3600)
    priority: int = 0
    first_byte_timeout: float = Field(300.0, gt=0, le=24 * 3600)
    idle_timeout: float = Field(300.0, gt=0, le=24 * 3600)
    max_in_flight: int = Field(32, ge=1, le=10_000)
    max_queued: int = Field(128, ge=0, le=100_000)
    queue_timeout: float = Field(30.0, gt=0, le=3600)
    cache_salt: bool = False

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return plain_http_base_url(value)

    @model_validator(mode="after")
    def _salt_is_vllm_only(self) -> "BackendConfig":
        if self.cache_salt and self.kind != "vllm":
            raise ValueError("cache_salt: only vLLM backends take a cache_salt")
        return self

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret:
            return None
        if any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in secret):
            raise ValueError("must be printable ASCII without spaces")
        return value


@dataclass(frozen=True)
class ModelCard:
    """A model as the registry lists it; ``to_openai()`` is its ``/v1/models`` entry.

    ``extras`` keeps backend-specific facts (Ollama size, family, quantization...) for admin views; they are
    not part of the OpenAI card.
    """

    id: str
    created: int
    owned_by: str
    backend: str
    kind: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))
        # Serialised once: the card is immutable and the list endpoint is the hot path.
        object.__setattr__(self, "_openai_json", compact_json(self.to_openai()))

    def to_openai(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}
        if self.root is not None:
            card["root"] = self.root
        if self.parent is not None:
            card["parent"] = self.parent
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        return card

    def openai_json(self) -> bytes:
        """``to_openai()`` as compact JSON bytes, byte-identical to Starlette's ``JSONResponse`` rendering."""
        return self._openai_json  # type: ignore[attr-defined]


def compact_json(value: Any) -> bytes:
    """JSON exactly as Starlette's JSONResponse renders it (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def openai_model_list(cards: Iterable[ModelCard]) -> bytes:
    """The body of an OpenAI ``GET /v1/models`` answer for these cards, assembled from the pre-serialised cards
    (same bytes as ``JSONResponse({"object": "list", "data": [c.to_openai() for c in cards]})``, without
    re-encoding every card on every request)."""
    return b'{"object":"list","data":[' + b",".join(card.openai_json() for card in cards) + b"]}"


def quote_text(text: str | bytes) -> str:
    """A short, single-line excerpt of backend output for an error reason."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def describe_transport_error(exc: httpx.HTTPError, config: BackendConfig) -> str:
    """Why a request did not get an answer, in words an operator can act on (no secrets)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timed out after {config.connect_timeout:g}s"
    if isinstance(exc, httpx.PoolTimeout):
        return "no free connection to the backend (pool timeout)"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within the {config.read_timeout:g}s read timeout"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {quote_text(str(exc)) or type(exc).__name__}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection closed or broken by the backend: {quote_text(str(exc)) or type(exc).__name__}"
    return f"{type(exc).__name__}: {quote_text(str(exc))}"


class Backend(ABC):
    """A driver for one configured backend. Discovery raises ``BackendUnavailable`` with a reason; it never
    lets a transport or parsing exception escape."""

    kind: ClassVar[str]
    can_pull: ClassVar[bool] = False
    can_delete: ClassVar[bool] = False

    def __init__(self, config: BackendConfig) -> None:
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} cannot drive a {config.kind!r} backend")
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return self.config.name

    # HTTP plumbing ---------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        """The backend's connection pool, created on first use in the running event loop (a pool cannot
        move between loops, so a new loop gets a new pool)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            headers = {"User-Agent": "cube-ai-enclave"}
            if self.config.api_key is not None:
                headers["Authorization"] = f"Bearer {self.config.api_key.get_secret_value()}"
            self._client = httpx.AsyncClient(
                base_url=self.config.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout),
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=4),
                # Backends are reached directly: proxy settings from the environment must not reroute them.
                trust_env=False,
                follow_redirects=False,
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            try:
                await client.aclose()
            except RuntimeError:  # its event loop is gone; nothing left to close
                pass

    async def get_json(self, path: str) -> Any:
        """GET ``path`` and return its parsed JSON; ``BackendUnavailable`` (with the reason) on anything else."""
        what = f"GET {path}"
        try:
            async with self.client().stream("GET", path) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DISCOVERY_BYTES:
                        raise BackendUnavailable(
                            self.name, f"malformed response from {what}: larger than {MAX_DISCOVERY_BYTES} bytes"
                        )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self.name, describe_transport_error(exc, self.config)) from None
        if response.status_code != 200:
            raise BackendUnavailable(self.name, self.describe_status(what, response.status_code, bytes(body)))
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendUnavailable(self.name, f"malformed response from {what}: not JSON ({exc})") from None

    def describe_status(self, what: str, status: int, body: bytes) -> str:
        reason = f"HTTP {status} from {what}"
        if status in (401, 403):
            hint = "an api_key is configured but refused" if self.config.api_key else "it needs an api_key"
            reason += f" ({hint})"
        excerpt = quote_text(body)
        return f"{reason}: {excerpt}" if excerpt else reason

    def parse(self, model: type[BaseModel], data: Any, what: str) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise BackendUnavailable(
                self.name, f"malformed response from {what}: {describe_validation_error(exc)}"
            ) from None

    # operations ------------------------------------------------------------------------------
    @abstractmethod
    async def discover(self) -> list[ModelCard]:
        """The models this backend serves now."""

    def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:
        raise UnsupportedOperation(self.name, self.kind, "pull")

    async def delete(self, model: str) -> None:
        raise UnsupportedOperation(self.name, self.kind, "delete")
