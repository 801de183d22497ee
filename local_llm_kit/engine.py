"""A loaded model: its backend, its chat template, and the lease that decides who uses it.

One :class:`Engine` is shared by every client that asks for the same weights with the same
load-time settings, so ten clients over one model cost one model's memory.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from local_llm_kit.backends import Backend, BackendOptions, create_backend
from local_llm_kit.backends.base import SlotView
from local_llm_kit.encoding import PromptEncoder, ReplyPlace
from local_llm_kit.lease import ModelLease, Ticket
from local_llm_kit.models import ResolvedModel
from local_llm_kit.slots import SlotTable
from local_llm_kit.speculation import PassCosts
from local_llm_kit.templates import ChatTemplate

__all__ = ["Engine", "detach", "get_engine", "loaded_engines", "unload_all"]

logger = logging.getLogger(__name__)

class Engine:
    def __init__(self, model: ResolvedModel, backend_name: str, backend: Backend) -> None:
        self.model = model
        self.backend_name = backend_name
        self.backend = backend
        self.lease = ModelLease()
        self.slots = SlotTable(backend.n_slots)
        self._users = 0  # open clients that hold this engine (see attach/detach)
        info = backend.info
        self.template = ChatTemplate.for_model(
            info.chat_template, info.architecture, bos_token=info.bos_token, eos_token=info.eos_token
        )
        if self.template.is_fallback:
            logger.info("%s ships no chat template; using the %s fallback", model.name, info.architecture)
        if 0 < info.n_ctx_train < backend.n_ctx:
            # Allowed (a user may know the model extrapolates), but never without a word: past its
            # trained length a model's replies degrade, and the KV cache is sized for the whole context.
            logger.warning("context_length %d is past the %d tokens %s was trained with: replies that reach "
                           "past them degrade, and the KV cache is allocated for all %d", backend.n_ctx,
                           info.n_ctx_train, model.name, backend.n_ctx)
        self.encoder = PromptEncoder(self.template, backend, model.name)
        self.pass_costs = PassCosts()  # learned by speculation, kept across generations

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def fingerprint(self) -> str:
        return f"llk-{self.backend_name}-{self.model.path.name}"

    def slot_backend(self, prompt: Sequence[int], ticket: Ticket | None) -> Backend:
        """The backend bound to the KV-cache slot ``prompt`` should use (see :mod:`local_llm_kit.slots`).

        Call it under the lease's step lock: it reads what every slot holds.
        """
        backend = self.backend
        cached = [backend.slot_tokens(i) for i in range(backend.n_slots)]
        index = self.slots.choose(prompt, cached, ticket)
        logger.debug("slot %d of %d for a %d-token prompt", index, backend.n_slots, len(prompt))
        return SlotView(backend, index)

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (rendering only what is new: see :mod:`local_llm_kit.encoding`)."""
        return self.encoder.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: exactly what the model is fed (see :mod:`local_llm_kit.encoding`)."""
        return self.encoder.encode(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]], *,
                      tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], ReplyPlace | None]:
        """The prompt's ids and where a reply to it stands (see :meth:`PromptEncoder.encode_prompt`)."""
        return self.encoder.encode_prompt(messages, tools=tools)

    def remember_generation(self, place: ReplyPlace | None, content: str, token_ids: Sequence[int]) -> None:
        """Record that ``content`` was generated as ``token_ids`` at ``place`` (from
        :meth:`encode_prompt`): later prompts with this reply after that conversation feed those ids again."""
        self.encoder.remember_generation(place, content, token_ids)

    @property
    def closed(self) -> bool:
        return self.lease.closed

    def close(self) -> None:
        """Unload the model: waits for the step in progress; later steps raise ModelUnloadedError."""
        if not self.lease.closed:
            self.lease.close(self.backend.close)


_engines: dict[tuple[str, str, BackendOptions], Engine] = {}
_engines_lock = threading.Lock()
_unload_at_exit_registered = False


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
            _register_unload_at_exit()
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


def _register_unload_at_exit() -> None:
    """Unload what is still loaded when the interpreter exits (clients never closed), before it
    tears modules down: a llama.cpp model freed during that teardown fails in llama-cpp-python's
    ``Llama.__del__`` ("'NoneType' object is not callable"), once per model. Registered after the
    first backend loaded (and imported its engine), so it runs before anything that engine
    registered. Called with ``_engines_lock`` held."""
    global _unload_at_exit_registered
    if not _unload_at_exit_registered:
        atexit.register(unload_all)
        _unload_at_exit_registered = True


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
