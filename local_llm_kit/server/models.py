"""The models a server was started with, and the bounded queue in front of each.

A loaded model generates for one request at a time (its engine lock serializes the KV cache),
so each served model has one generation slot and a bounded number of requests waiting for it.
Past that bound a request is refused at once with 503 rather than queued without limit.
Requests name a model by its id (or the name the operator started it with); a request can
never make the server load anything.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from local_llm_kit.client import AsyncLLMClient
from local_llm_kit.server.errors import APIError

__all__ = ["ServedModel", "ServedModels", "Slot"]


@dataclass
class Slot:
    """The right to generate with one model; :meth:`ServedModel.release` gives it back once."""

    model: ServedModel
    released: bool = False


class ServedModel:
    def __init__(self, client: AsyncLLMClient, max_queue: int) -> None:
        self.client = client
        self.id = client.model
        names = {self.id}
        given = client.settings.model
        # The operator's spelling is accepted too, unless it is a path (never echo file paths).
        if os.sep not in given and "/" not in given:
            names.add(given)
        self.names = frozenset(names)
        self.created = int(time.time())
        self.max_queue = max_queue
        self.waiting = 0
        self.generating = 0
        self._slot = asyncio.Semaphore(1)

    async def acquire(self) -> Slot:
        """Wait for the generation slot, or raise 503 when the queue is already full."""
        if self.waiting + self.generating >= 1 + self.max_queue:
            raise APIError(503, f"the server is busy: {self.waiting} requests are already waiting for "
                           f"{self.id}; retry later", type="server_error", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self.waiting -= 1
        self.generating += 1
        return Slot(self)

    def release(self, slot: Slot) -> None:
        if not slot.released:
            slot.released = True
            self.generating -= 1
            self._slot.release()


class ServedModels:
    """Lookup of served models by the name a request gives."""

    def __init__(self, clients: Sequence[AsyncLLMClient], max_queue: int) -> None:
        if not clients:
            raise ValueError("a server needs at least one model")
        self.models = [ServedModel(client, max_queue) for client in clients]
        self._by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in model.names:
                if name in self._by_name:
                    raise ValueError(f"two served models answer to the name {name!r}")
                self._by_name[name] = model

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def get(self, name: object) -> ServedModel:
        """The model a request names (the first served model when it names none)."""
        if name is None:
            return self.default
        if not isinstance(name, str):
            raise APIError(400, f"model must be a string, got {type(name).__name__}", param="model",
                           code="invalid_type")
        model = self._by_name.get(name)
        if model is None:
            served = ", ".join(sorted(m.id for m in self.models))
            raise APIError(404, f"the model {name!r} is not served here; served: {served}", param="model",
                           code="model_not_found")
        return model

    def by_id(self, model_id: str) -> ServedModel | None:
        return next((m for m in self.models if m.id == model_id), None)

    @property
    def generating(self) -> int:
        return sum(m.generating for m in self.models)

    @property
    def waiting(self) -> int:
        return sum(m.waiting for m in self.models)
