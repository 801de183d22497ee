"""A loaded model: its backend, its chat template, and the lease that decides who uses it.

One :class:`Engine` is shared by every client that asks for the same weights with the same
load-time settings, so ten clients over one model cost one model's memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from local_llm_kit.backends import Backend, BackendOptions, create_backend
from local_llm_kit.backends.base import SlotView
from local_llm_kit.errors import TemplateError
from local_llm_kit.lease import ModelLease, Ticket
from local_llm_kit.models import ResolvedModel
from local_llm_kit.slots import SlotTable
from local_llm_kit.templates import ChatTemplate

__all__ = ["Engine", "detach", "get_engine", "loaded_engines", "unload_all"]

logger = logging.getLogger(__name__)

# Recent replies whose generated token ids are kept for re-use in the next prompts.
_REMEMBERED_GENERATIONS = 64
# Tokenized segments of recent prompts (see Engine._tokenize): a turn is tokenized once.
_SEGMENT_MEMO = 4096
# Segmented tokenizations checked against a whole one before the engine trusts segmenting.
_SEGMENT_CHECKS = 8
# Recent renderings kept for incremental rendering, and how many incremental renderings are
# checked against a whole rendering before the engine trusts its template with them.
_RENDER_MEMO = 64
_RENDER_LOOKBACK = 8
_RENDER_CHECKS = 8


class Engine:
    def __init__(self, model: ResolvedModel, backend_name: str, backend: Backend) -> None:
        self.model = model
        self.backend_name = backend_name
        self.backend = backend
        self.lease = ModelLease()
        self.slots = SlotTable(backend.n_slots)
        self._users = 0  # open clients that hold this engine (see attach/detach)
        self._generated: OrderedDict[str, list[int]] = OrderedDict()
        self._generated_lock = threading.Lock()
        self._segments: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._segments_lock = threading.Lock()
        self._segment_checks = _SEGMENT_CHECKS
        self._boundaries = self._segment_boundaries()
        # Incremental rendering (see render()): frozen messages and tools -> text without the
        # generation prompt.
        self._renders: OrderedDict[tuple[str, tuple[Any, ...]], str] = OrderedDict()
        self._renders_lock = threading.Lock()
        self._render_checks = _RENDER_CHECKS
        self.incremental_render = True
        # Reply markers (see _split_at_replies) are unique to this engine, not to each call, so
        # that marked conversations render incrementally too.
        self._marker_salt = uuid.uuid4().hex
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
        """The chat template applied to ``messages``, rendering only what is new when it can.

        A conversation whose earlier messages were rendered recently is rendered as that text
        plus the rendering of the new messages: the template is applied to the opening messages
        (system messages and the first one after them, which templates treat specially), the
        last already-rendered message (which some templates look back to) and the new messages,
        and the opening's own rendering is cut off. The first few such renderings are checked
        against a whole rendering; a template whose output differs (one that looks further
        back, or rewrites earlier turns) is rendered whole from then on.
        """
        if not self.incremental_render or len(messages) < 3:
            return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            tools_key = json.dumps(tools, sort_keys=True, default=str) if tools else ""
            frozen = tuple(_freeze(m) for m in messages)
        except (TypeError, ValueError):  # content that does not serialize: nothing to memoize
            return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        text = self._render_incrementally(messages, frozen, tools, tools_key, add_generation_prompt)
        if text is None:
            text = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            # What the next turn builds on: the text without the generation prompt.
            self._remember_render(tools_key, frozen, text if not add_generation_prompt else
                                  self.template.render(messages, tools=tools, add_generation_prompt=False))
        return text

    def _render_incrementally(self, messages: Sequence[Mapping[str, Any]], frozen: tuple[Any, ...],
                              tools: Sequence[Mapping[str, Any]] | None, tools_key: str,
                              add_generation_prompt: bool) -> str | None:
        opening = 0
        while opening < len(messages) and messages[opening].get("role") == "system":
            opening += 1
        opening += 1  # and the first message after the system messages
        # The known part is the conversation up to its last few messages (the previous turn:
        # a reply, tool results, the new user message); looked up by hash, longest first.
        best: tuple[int, str] | None = None
        with self._renders_lock:
            for n in range(len(frozen), max(opening, len(frozen) - _RENDER_LOOKBACK), -1):
                key = (tools_key, frozen[:n])
                rendered = self._renders.get(key)
                if rendered is not None:
                    self._renders.move_to_end(key)
                    best = (n, rendered)
                    break
        if best is None:
            return None
        known, known_text = best
        anchor = [*messages[:opening], *messages[max(opening, known - 1):known]]
        new = list(messages[known:])
        render = self.template.render
        head = render(anchor, tools=tools, add_generation_prompt=False)
        tail_open = render([*anchor, *new], tools=tools, add_generation_prompt=False)
        tail = tail_open if not add_generation_prompt else render([*anchor, *new], tools=tools,
                                                                  add_generation_prompt=True)
        if not (tail_open.startswith(head) and tail.startswith(head)):
            return None
        text = known_text + tail[len(head):]
        if self._render_checks > 0:
            whole = render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            with self._renders_lock:
                self._render_checks -= 1
                if whole != text:
                    logger.warning("%s: the chat template renders conversations differently in parts than whole; "
                                   "rendering whole from now on", self.model.name)
                    self.incremental_render = False
                    self._render_checks = 0
            if whole != text:
                return whole
        if new:
            self._remember_render(tools_key, frozen, known_text + tail_open[len(head):])
        return text

    def _remember_render(self, tools_key: str, frozen: tuple[Any, ...], text: str) -> None:
        with self._renders_lock:
            self._renders[(tools_key, frozen)] = text
            self._renders.move_to_end((tools_key, frozen))
            while len(self._renders) > _RENDER_MEMO:
                self._renders.popitem(last=False)

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
            return self._tokenize(text)
        pieces = self._split_at_replies(messages, generated, text, tools, add_generation_prompt)
        if pieces is None:
            return self._tokenize(text)
        ids: list[int] = []
        for piece, index in zip(pieces, [*sorted(generated), None], strict=True):
            if piece:
                ids.extend(self._tokenize(piece))
            if index is not None:
                ids.extend(generated[index])
        return ids

    # -- incremental tokenization -------------------------------------------------------------
    def _segment_boundaries(self) -> tuple[str, ...]:
        """Texts of the end-of-turn special tokens, before which a prompt may be cut (see :meth:`_tokenize`).

        Only tokens the tokenizer reads back as themselves qualify: their markup in a text is
        parsed as the one special token, which is what makes the cut exact.
        """
        backend = self.backend
        found: list[str] = []
        for token in sorted(backend.info.eos_token_ids):
            try:
                text = backend.token_bytes(token).decode("utf-8")
                if len(text) > 1 and backend.tokenize(text) == [token]:
                    found.append(text)
            except (UnicodeDecodeError, IndexError, ValueError):
                continue
        return tuple(found)

    def _split_segments(self, text: str) -> list[str]:
        """``text`` cut right before every end-of-turn special token (one segment per turn)."""
        cuts = sorted({i for marker in self._boundaries for i in _find_all(text, marker) if i > 0})
        if not cuts:
            return [text]
        return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    def _tokenize(self, text: str) -> list[int]:
        """``backend.tokenize(text)``, re-using the tokens of segments seen in earlier prompts.

        Tokenizers (llama.cpp's and Hugging Face's) split a text at special tokens before
        anything else and tokenize the pieces independently, so the text cut right before an
        end-of-turn token tokenizes to the concatenation of its segments' tokens. Each turn of a
        conversation is then tokenized once, when it is new; later requests with the same
        history only look its segments up, so the cost of a request follows its new tokens, not
        the history. The first few segmented results are checked against a whole tokenization
        of the same text; a tokenizer for which they differ (one that strips whitespace around
        special tokens, say) is always tokenized whole from then on.
        """
        segments = self._split_segments(text) if self._boundaries else [text]
        ids: list[int] = []
        misses: list[tuple[int, str]] = []
        with self._segments_lock:
            found: list[tuple[int, ...] | None] = []
            for segment in segments:
                cached = self._segments.get(segment)
                if cached is not None:
                    self._segments.move_to_end(segment)
                found.append(cached)
        for i, (segment, cached) in enumerate(zip(segments, found, strict=True)):
            if cached is None:
                cached = tuple(self.backend.tokenize(segment))
                misses.append((i, segment))
                found[i] = cached
            ids.extend(cached)
        if misses:
            with self._segments_lock:
                for i, segment in misses:
                    self._segments[segment] = found[i]  # type: ignore[assignment]
                while len(self._segments) > _SEGMENT_MEMO:
                    self._segments.popitem(last=False)
        if len(segments) > 1 and self._segment_checks > 0:
            self._check_segmented(text, ids)
        return ids

    def _check_segmented(self, text: str, ids: list[int]) -> None:
        whole = self.backend.tokenize(text)
        with self._segments_lock:
            self._segment_checks -= 1
            if whole != ids:
                logger.warning("%s: tokenizing a prompt turn by turn gave other ids than tokenizing it whole; "
                               "tokenizing whole from now on", self.model.name)
                self._boundaries = ()
                self._segment_checks = 0
        if whole != ids:
            ids[:] = whole

    def _split_at_replies(self, messages: Sequence[Mapping[str, Any]], generated: Mapping[int, list[int]],
                          text: str, tools: Sequence[Mapping[str, Any]] | None,
                          add_generation_prompt: bool) -> list[str] | None:
        """The rendered text around the generated replies, found by where the template puts them.

        Each reply is rendered as a unique marker instead; the text between markers is what
        surrounds the replies. Searching for the reply's text instead would find a short reply
        ("Paris") inside an earlier message. ``None`` when the template treats the markers
        differently from the replies (it inspects or rewrites content): then nothing is spliced.
        """
        markers = {i: f"\x1e\x1fllk-reply-{i}-{self._marker_salt}\x1f\x1e" for i in generated}
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


def _freeze(message: Mapping[str, Any]) -> Any:
    """An immutable, hashable snapshot of a message, to tell whether it was rendered before."""
    items = tuple(message.items())
    try:
        hash(items)  # str, numbers, None: the common message; lists and dicts (tool calls) are not
    except TypeError:
        return json.dumps(message, sort_keys=True)
    return items


def _find_all(text: str, marker: str) -> Iterator[int]:
    start = text.find(marker)
    while start >= 0:
        yield start
        start = text.find(marker, start + len(marker))


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
