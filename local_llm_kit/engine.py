"""A loaded model: its backend, its chat template, and the lease that decides who uses it.

One :class:`Engine` is shared by every client that asks for the same weights with the same
load-time settings, so ten clients over one model cost one model's memory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from local_llm_kit.backends import Backend, BackendOptions, create_backend
from local_llm_kit.errors import TemplateError
from local_llm_kit.lease import ModelLease
from local_llm_kit.models import ResolvedModel
from local_llm_kit.templates import ChatTemplate

__all__ = ["Engine", "detach", "get_engine", "loaded_engines", "unload_all"]

logger = logging.getLogger(__name__)

# Recent replies whose generated token ids are kept for re-use in the next prompts.
_REMEMBERED_GENERATIONS = 64


class Engine:
    def __init__(self, model: ResolvedModel, backend_name: str, backend: Backend) -> None:
        self.model = model
        self.backend_name = backend_name
        self.backend = backend
        self.lease = ModelLease()
        self._users = 0  # open clients that hold this engine (see attach/detach)
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
        with self._generated_lock:
            generated = {i: self._generated[m["content"]] for i, m in enumerate(messages)
                         if m.get("role") == "assistant" and isinstance(m.get("content"), str)
                         and m["content"] in self._generated}
        if not generated:
            return self.backend.tokenize(text)
        pieces = self._split_at_replies(messages, generated, text, tools, add_generation_prompt)
        if pieces is None:
            return self.backend.tokenize(text)
        ids: list[int] = []
        for piece, index in zip(pieces, [*sorted(generated), None], strict=True):
            if piece:
                ids.extend(self.backend.tokenize(piece))
            if index is not None:
                ids.extend(generated[index])
        return ids

    def _split_at_replies(self, messages: Sequence[Mapping[str, Any]], generated: Mapping[int, list[int]],
                          text: str, tools: Sequence[Mapping[str, Any]] | None,
                          add_generation_prompt: bool) -> list[str] | None:
        """The rendered text around the generated replies, found by where the template puts them.

        Each reply is rendered as a unique marker instead; the text between markers is what
        surrounds the replies. Searching for the reply's text instead would find a short reply
        ("Paris") inside an earlier message. ``None`` when the template treats the markers
        differently from the replies (it inspects or rewrites content): then nothing is spliced.
        """
        markers = {i: f"\x1e\x1fllk-reply-{i}-{uuid.uuid4().hex}\x1f\x1e" for i in generated}
        marked = [dict(m, content=markers[i]) if i in markers else m for i, m in enumerate(messages)]
        try:
            rendered = self.render(marked, tools=tools, add_generation_prompt=add_generation_prompt)
        except TemplateError:  # a template that rejects the marker: no splicing, same prompt
            logger.debug("template rejected reply markers; re-tokenizing replies", exc_info=True)
            return None
        pieces: list[str] = []
        rest = rendered
        for i in sorted(generated):
            before, found, rest = rest.partition(markers[i])
            if not found or markers[i] in rest:
                return None
            pieces.append(before)
        pieces.append(rest)
        rebuilt = "".join(p + (messages[i]["content"] if k < len(generated) else "")
                          for k, (p, i) in enumerate(zip(pieces, [*sorted(generated), -1], strict=True)))
        return pieces if rebuilt == text else None

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

    @property
    def closed(self) -> bool:
        return self.lease.closed

    def close(self) -> None:
        """Unload the model: waits for the step in progress; later steps raise ModelUnloadedError."""
        if not self.lease.closed:
            self.lease.close(self.backend.close)


_engines: dict[tuple[str, str, BackendOptions], Engine] = {}
_engines_lock = threading.Lock()


def get_engine(model: ResolvedModel, backend_name: str, options: BackendOptions, *,
               attach: bool = False) -> Engine:
    """The shared engine for these weights and settings, loading it on first use.

    ``attach`` counts the caller as a user of the engine until it calls :func:`detach`: the
    last user to detach unloads the model.
    """
    key = (backend_name, str(model.path.resolve()), options)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or engine.closed:
            started = time.perf_counter()
            logger.info("loading %s with %s (n_ctx=%d)", model.path, backend_name, options.n_ctx)
            engine = Engine(model, backend_name, create_backend(backend_name, str(model.path), options))
            logger.info("loaded %s in %.2f s", model.name, time.perf_counter() - started)
            _engines[key] = engine
        if attach:
            engine._users += 1
        return engine


def detach(engine: Engine) -> None:
    """A user of ``engine`` is done with it; the last one unloads the model."""
    with _engines_lock:
        engine._users = max(0, engine._users - 1)
        if engine._users:
            return
        for key, cached in list(_engines.items()):
            if cached is engine:
                del _engines[key]
    logger.info("unloading %s: its last client closed", engine.model.name)
    engine.close()


def loaded_engines() -> list[Engine]:
    with _engines_lock:
        return list(_engines.values())


def unload_all() -> None:
    """Release every loaded model.

    Clients that still exist load their model again on their next request; a generation running
    meanwhile stops with :class:`~local_llm_kit.errors.ModelUnloadedError` at its next token.
    """
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
