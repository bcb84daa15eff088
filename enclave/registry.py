"""The platform-wide models registry: which models exist, on which backend, and which backends are up.

Discovery runs in the background (every ``refresh_interval`` seconds, all backends concurrently); the request
path only reads the cached result, so ``models()`` and ``get()`` do no I/O. A backend whose discovery fails
(refused, timed out, HTTP error, malformed body) is marked down with the reason and its models leave the list
at once; the other backends are unaffected. When it answers again its models come back at the next refresh.

Routing rule for a model id offered by several backends (deterministic): the backend with the highest
``priority`` wins; on equal priority, the one listed first in the configuration wins (backend names are unique,
so this order is total). The other copies are *shadowed*: not listed separately, not routed to, but recorded
(``routes()``), and the next in line takes over as soon as the winner stops offering the model or goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from enclave.backends import Backend, BackendConfig, ModelCard, make_backend
from enclave.backends.base import check_model_name, openai_model_list
from enclave.backends.errors import (
    BackendUnavailable,
    InvalidModelName,
    ModelNotFound,
    PullError,
    PullModelNotFound,
    RegistryError,
    UnknownBackend,
    UnsupportedOperation,
)

__all__ = [
    "BackendStatus",
    "BackendUnavailable",
    "InvalidModelName",
    "ModelNotFound",
    "PullError",
    "PullModelNotFound",
    "Registry",
    "RegistryError",
    "Route",
    "UnknownBackend",
    "UnsupportedOperation",
    "openai_model_list",
]

log = logging.getLogger("enclave.registry")

NOT_YET_REFRESHED = "not refreshed yet"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    kind: str
    up: bool
    error: str | None
    last_ok: datetime | None
    models: int
    #: when discovery was last attempted (successful or not)
    last_attempt: datetime | None = None
    #: how many of this backend's models are shadowed by a higher-ranked backend
    shadowed: int = 0


@dataclass(frozen=True)
class Route:
    """Where a model id goes (``backend``) and which other backends also offer it, in rank order."""

    model: str
    backend: str
    shadowed: tuple[str, ...] = ()


@dataclass
class _BackendState:
    config: BackendConfig
    driver: Backend
    rank: int  # position in the configuration
    up: bool = False
    error: str | None = NOT_YET_REFRESHED
    last_ok: datetime | None = None
    last_attempt: datetime | None = None
    cards: tuple[ModelCard, ...] = ()


@dataclass(frozen=True)
class _Snapshot:
    """Everything the request path reads, swapped in one assignment after each refresh."""

    listed: tuple[ModelCard, ...] = ()
    by_id: dict[str, ModelCard] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    statuses: tuple[BackendStatus, ...] = ()
    any_up: bool = False


class Registry:
    """Models of every configured backend, with a routing table (see the module docstring for the rule).

    ``refresh_interval`` <= 0 disables the background loop (refresh only on demand).
    """

    def __init__(self, backends: Sequence[BackendConfig], *, refresh_interval: float = 30.0) -> None:
        names = [b.name for b in backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        self._configs = list(backends)
        self._states: dict[str, _BackendState] = {
            config.name: _BackendState(config=config, driver=make_backend(config), rank=rank)
            for rank, config in enumerate(backends)
        }
        self.refresh_interval = refresh_interval
        self._snapshot = _Snapshot()
        self._rebuild()
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Refresh once now, then keep refreshing in the background."""
        await self.refresh()
        if self.refresh_interval > 0 and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._refresh_loop(), name="registry-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for state in self._states.values():
            await state.driver.aclose()

    async def __aenter__(self) -> "Registry":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # refresh never raises by design; keep the loop alive if it ever does
                log.exception("registry refresh failed unexpectedly")

    # refreshing ------------------------------------------------------------------------------
    def _refresh_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def refresh(self) -> None:
        """Rediscover every backend concurrently; never raises for a backend failure."""
        await self._refresh(self._states.values())

    async def _refresh(self, states: Iterable[_BackendState]) -> None:
        states = list(states)
        async with self._refresh_lock():
            await asyncio.gather(*(self._discover(state) for state in states))
            self._rebuild()

    async def _discover(self, state: _BackendState) -> None:
        config = state.config
        # An overall bound as well as httpx's per-phase ones: a backend dribbling bytes cannot hold a refresh.
        budget = config.connect_timeout + 2 * config.read_timeout
        reason: str | None
        cards: list[ModelCard] = []
        try:
            async with asyncio.timeout(budget):
                cards = await state.driver.discover()
            reason = None
        except BackendUnavailable as exc:
            reason = exc.reason
        except TimeoutError:
            reason = f"discovery took longer than {budget:g}s"
        except Exception as exc:  # a driver bug must not take the registry (or other backends) down
            log.exception("discovery on backend %s raised", config.name)
            reason = f"internal error during discovery: {type(exc).__name__}"
        now = datetime.now(timezone.utc)
        was_up, previous_error = state.up, state.error
        state.last_attempt = now
        if reason is None:
            state.up, state.error, state.last_ok, state.cards = True, None, now, tuple(cards)
            if not was_up:
                log.info("backend %s (%s) is up with %d models", config.name, config.kind, len(cards))
        else:
            state.up, state.error, state.cards = False, reason, ()
            if was_up or previous_error != reason:
                log.warning("backend %s (%s) is down: %s", config.name, config.kind, reason)

    def _rebuild(self) -> None:
        candidates: dict[str, list[tuple[int, int, ModelCard]]] = {}
        for state in self._states.values():
            if not state.up:
                continue
            for card in state.cards:
                candidates.setdefault(card.id, []).append((-state.config.priority, state.rank, card))
        by_id: dict[str, ModelCard] = {}
        routes: dict[str, Route] = {}
        for model_id, offers in candidates.items():
            offers.sort(key=lambda offer: offer[:2])
            winner = offers[0][2]
            by_id[model_id] = winner
            routes[model_id] = Route(model_id, winner.backend, tuple(o[2].backend for o in offers[1:]))
        listed = tuple(by_id[model_id] for model_id in sorted(by_id))
        statuses = tuple(
            BackendStatus(
                name=state.config.name,
                kind=state.config.kind,
                up=state.up,
                error=state.error,
                last_ok=state.last_ok,
                models=len(state.cards),
                last_attempt=state.last_attempt,
                shadowed=sum(1 for card in state.cards if routes[card.id].backend != state.config.name),
            )
            for state in self._states.values()
        )
        self._snapshot = _Snapshot(listed=listed, by_id=by_id, routes=routes, statuses=statuses,
                                   any_up=any(status.up for status in statuses))

    # reading (no I/O) ----------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        """Routable models, one per id, sorted by id."""
        return list(self._snapshot.listed)

    def get(self, model_id: str) -> ModelCard | None:
        return self._snapshot.by_id.get(model_id)

    def route(self, model_id: str) -> Route | None:
        return self._snapshot.routes.get(model_id)

    def routes(self) -> list[Route]:
        """Every routable id with its winner and shadowed copies, sorted by id."""
        snapshot = self._snapshot
        return [snapshot.routes[card.id] for card in snapshot.listed]

    def backends(self) -> list[BackendConfig]:
        return list(self._configs)

    def backend_models(self, backend: str) -> list[ModelCard]:
        """Every model the backend offers (routable or shadowed), sorted by id."""
        return sorted(self._state(backend).cards, key=lambda card: card.id)

    def status(self) -> list[BackendStatus]:
        """One entry per configured backend, in configuration order (what /ready reports); precomputed at
        each refresh, so it is cheap enough for the request path."""
        return list(self._snapshot.statuses)

    def any_up(self) -> bool:
        """Whether at least one backend answered its last discovery (False before the first refresh)."""
        return self._snapshot.any_up

    def _state(self, backend: str) -> _BackendState:
        state = self._states.get(backend)
        if state is None:
            raise UnknownBackend(backend)
        return state

    # changing models -----------------------------------------------------------------------------
    def pull(self, backend: str, model: str) -> AsyncIterator[dict[str, Any]]:
        """Add ``model`` to ``backend``, yielding the backend's progress objects unchanged.

        Checks happen now, before any streaming starts: ``UnknownBackend``, ``UnsupportedOperation`` (vLLM),
        ``InvalidModelName``. While streaming: ``PullError`` (``PullModelNotFound`` for a name the backend's
        upstream does not have) or ``BackendUnavailable``. The backend is rediscovered when the stream ends,
        however it ends.
        """
        state = self._state(backend)
        if not state.driver.can_pull:
            state.driver.pull(model)  # raises UnsupportedOperation with the driver's own explanation
            raise UnsupportedOperation(backend, state.config.kind, "pull")
        check_model_name(model)
        return self._pull_then_refresh(state, model)

    async def _pull_then_refresh(self, state: _BackendState, model: str) -> AsyncIterator[dict[str, Any]]:
        try:
            async for progress in state.driver.pull(model):
                yield progress
        finally:
            await self._refresh([state])

    async def remove(self, model_id: str, backend: str | None = None) -> None:
        """Delete a model from a backend and rediscover it.

        Without ``backend``: the backend the id routes to now (a shadowed copy then becomes routable).
        """
        if backend is None:
            card = self.get(model_id)
            if card is None:
                raise ModelNotFound(model_id)
            state = self._states[card.backend]
        else:
            state = self._state(backend)
        if not state.driver.can_delete:
            await state.driver.delete(model_id)  # raises UnsupportedOperation with the driver's explanation
            raise UnsupportedOperation(state.config.name, state.config.kind, "delete")
        check_model_name(model_id)
        try:
            await state.driver.delete(model_id)
        finally:
            await self._refresh([state])
