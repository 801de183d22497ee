"""A loaded model: its backend, its chat template, and the lock that serializes its use.

One :class:`Engine` is shared by every client that asks for the same weights with the same
load-time settings, so ten clients over one model cost one model's memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from local_llm_kit.backends import Backend, BackendOptions, create_backend
from local_llm_kit.models import ResolvedModel
from local_llm_kit.templates import ChatTemplate

__all__ = ["Engine", "get_engine", "loaded_engines", "unload_all"]

logger = logging.getLogger(__name__)

# Recent replies whose generated token ids are kept for re-use in the next prompts.
_REMEMBERED_GENERATIONS = 64


class Engine:
    def __init__(self, model: ResolvedModel, backend_name: str, backend: Backend) -> None:
        self.model = model
        self.backend_name = backend_name
        self.backend = backend
        self.lock = threading.RLock()
        self._generated: OrderedDict[str, list[int]] = OrderedDict()
        self._generated_lock = threading.Lock()
        info = backend.info
        self.template = ChatTemplate.for_model(
            info.chat_template, info.architecture, bos_token=info.bos_token, eos_token=info.eos_token
        )
        if self.template.is_fallback:
            logger.info("%s ships no chat template; using the %s fallback", model.name, info.architecture)

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def fingerprint(self) -> str:
        return f"llk-{self.backend_name}-{self.model.path.name}"

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: exactly what the model is fed.

        An assistant message this engine generated keeps the token ids it was generated as:
        re-tokenizing its text can yield other ids, which would defeat KV-cache reuse next turn
        (and change what the model sees). The rest of the text is tokenized normally.
        """
        text = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        cursor = 0
        with self._generated_lock:
            spans = [(m["content"], self._generated.get(m["content"])) for m in messages
                     if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"]]
        for content, generated in spans:
            if generated is None:
                continue
            start = text.find(content, cursor)
            if start < 0:
                continue
            if start > cursor:
                ids.extend(self.backend.tokenize(text[cursor:start]))
            ids.extend(generated)
            cursor = start + len(content)
        if cursor < len(text):
            ids.extend(self.backend.tokenize(text[cursor:]))
        return ids

    def remember_generation(self, content: str, token_ids: Sequence[int]) -> None:
        """Record that ``content`` was generated as ``token_ids`` (for :meth:`encode`)."""
        ids = [t for t in token_ids if t not in self.backend.info.eos_token_ids]
        if not content or b"".join(self.backend.token_bytes(t) for t in ids) != content.encode():
            return  # a stop string or a constraint changed the text: nothing to splice
        with self._generated_lock:
            self._generated[content] = ids
            self._generated.move_to_end(content)
            while len(self._generated) > _REMEMBERED_GENERATIONS:
                self._generated.popitem(last=False)

    def close(self) -> None:
        with self.lock:
            self.backend.close()


_engines: dict[tuple[str, str, BackendOptions], Engine] = {}
_engines_lock = threading.Lock()


def get_engine(model: ResolvedModel, backend_name: str, options: BackendOptions) -> Engine:
    """The shared engine for these weights and settings, loading it on first use."""
    key = (backend_name, str(model.path.resolve()), options)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            started = time.perf_counter()
            logger.info("loading %s with %s (n_ctx=%d)", model.path, backend_name, options.n_ctx)
            engine = Engine(model, backend_name, create_backend(backend_name, str(model.path), options))
            logger.info("loaded %s in %.2f s", model.name, time.perf_counter() - started)
            _engines[key] = engine
        return engine


def loaded_engines() -> list[Engine]:
    with _engines_lock:
        return list(_engines.values())


def unload_all() -> None:
    """Release every loaded model (their clients reload lazily if used again)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
