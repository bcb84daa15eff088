"""vLLM driver: discovery from its OpenAI-compatible ``/v1/models``; no pull or delete (fixed at launch).

``created``: vLLM fills it with ``int(time.time())`` at *request* time, so it changes on every call and would
make the list unstable (clients that sort or cache by ``created`` reorder or refetch). The driver uses instead
the moment this process first saw the model on this backend, and keeps that value across refreshes, across the
model disappearing and returning, and across vLLM restarts, for the life of the enclave process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from enclave.backends.base import Backend, BackendConfig, ModelCard
from enclave.backends.errors import UnsupportedOperation

_FIXED_AT_LAUNCH = (
    "vLLM serves the models it was started with (--model, --served-model-name, --lora-modules); "
    "change the vLLM deployment instead"
)


class _Card(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1)
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = Field(default=None, ge=1)


class _ModelList(BaseModel):
    model_config = ConfigDict(extra="ignore")
    object: str = "list"
    data: list[_Card]


class VllmBackend(Backend):
    kind: ClassVar[str] = "vllm"

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._first_seen: dict[str, int] = {}

    async def discover(self) -> list[ModelCard]:
        listing: _ModelList = self.parse(_ModelList, await self.get_json("/v1/models"), "GET /v1/models")
        now = int(time.time())
        cards: dict[str, ModelCard] = {}
        for card in listing.data:
            if card.id in cards:
                continue
            created = self._first_seen.setdefault(card.id, now)
            cards[card.id] = ModelCard(
                id=card.id,
                created=created,
                owned_by=card.owned_by or self.name,
                backend=self.name,
                kind=self.kind,
                root=card.root,
                parent=card.parent,
                max_model_len=card.max_model_len,
                extras={"backend_created": card.created} if card.created is not None else {},
            )
        return list(cards.values())

    def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:
        raise UnsupportedOperation(self.name, self.kind, "pull", _FIXED_AT_LAUNCH)

    async def delete(self, model: str) -> None:
        raise UnsupportedOperation(self.name, self.kind, "delete", _FIXED_AT_LAUNCH)
