"""The request path: a validated request in, a response or a stream of chunks out.

render the conversation -> check it fits -> run the decode loop once per choice -> shape.
Both backends, every output mode and both client flavours (sync, async) go through here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from local_llm_kit import structured
from local_llm_kit.decoding import Finished, GenerationSettings, TextPiece, generate
from local_llm_kit.encoding import ReplyPlace
from local_llm_kit.engine import Engine
from local_llm_kit.errors import GenerationCancelledError, TokenLimitError
from local_llm_kit.lease import Ticket
from local_llm_kit.output import OutputMode
from local_llm_kit.request import ChatRequest
from local_llm_kit.sampling import SamplingParams
from local_llm_kit.types import (
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChunk,
    CompletionResponse,
    Delta,
    Message,
    TokenLogprob,
    Usage,
)

__all__ = ["PreparedChat", "complete", "encode_request", "prepare", "stream"]


@dataclass(frozen=True)
class PreparedChat:
    request: ChatRequest
    output: OutputMode
    prompt: list[int]
    reply_place: ReplyPlace | None
    """Where the reply stands: the conversation as it was encoded (see :meth:`Engine.remember_generation`)."""
    max_tokens: int
    model_name: str


def select_output_mode(engine: Engine, request: ChatRequest) -> OutputMode:
    """Plain text, or the JSON / tool-call mode the request asks for (see :mod:`local_llm_kit.structured`)."""
    return structured.select_output_mode(engine, request)


def encode_request(engine: Engine, request: ChatRequest) -> tuple[OutputMode, list[int]]:
    """The output mode of a request and the exact prompt token ids it feeds the model."""
    output, prompt, _ = _encode(engine, request)
    return output, prompt


def _encode(engine: Engine, request: ChatRequest) -> tuple[OutputMode, list[int], ReplyPlace | None]:
    with engine.lease.reading():
        output = select_output_mode(engine, request)
        messages = output.prepare_messages(request.messages)
        return output, *engine.encode_prompt(messages, tools=output.template_tools)


def prepare(engine: Engine, request: ChatRequest, model_name: str) -> PreparedChat:
    """Render and tokenize the prompt and check it against the context window."""
    output, prompt, reply_place = _encode(engine, request)
    n_ctx = engine.n_ctx
    room = n_ctx - len(prompt)
    if room <= 0 or (request.max_tokens is not None and request.max_tokens > room):
        asked = f" plus max_tokens={request.max_tokens}" if request.max_tokens is not None else ""
        raise TokenLimitError(
            f"the prompt is {len(prompt)} tokens{asked}, which exceeds the context length of "
            f"{n_ctx} tokens; shorten the messages, lower max_tokens or raise context_length",
            prompt_tokens=len(prompt), max_tokens=request.max_tokens, context_length=n_ctx,
            param="max_tokens" if room > 0 else "messages",
        )
    max_tokens = request.max_tokens if request.max_tokens is not None else room
    return PreparedChat(request, output, prompt, reply_place, max_tokens, request.model or model_name)


def _settings(prepared: PreparedChat, choice_index: int) -> GenerationSettings:
    r = prepared.request
    seed = None if r.seed is None else r.seed + choice_index
    return GenerationSettings(
        max_tokens=prepared.max_tokens,
        sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, seed=seed,
                                presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
                                logit_bias=r.logit_bias),
        stop=r.stop,
        top_logprobs=r.top_logprobs if r.logprobs else None,
        draft_tokens=r.draft_tokens or 0,
    )


def _run(engine: Engine, prepared: PreparedChat, index: int, ticket: Ticket,
         cancel: threading.Event | None) -> Iterator[TextPiece | Finished]:
    # The KV-cache slot is chosen at the first step, under the step lock (a generator body).
    backend = engine.slot_backend(prepared.prompt, ticket)
    yield from generate(backend, prepared.prompt, _settings(prepared, index),
                        constraint=prepared.output.constraint(), cancel=cancel, pass_costs=engine.pass_costs)


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def complete(engine: Engine, prepared: PreparedChat, cancel: threading.Event | None = None) -> CompletionResponse:
    """The whole reply at once; the model is held from the first token of the first choice to the last."""
    choices: list[Choice] = []
    completion_tokens = 0
    with engine.lease.generation(cancel) as ticket:
        if ticket is None:
            raise GenerationCancelledError("generation was cancelled before it started")
        with ticket.step():
            for index in range(prepared.request.n):
                texts: list[str] = []
                logprobs: list[TokenLogprob] = []
                finished: Finished | None = None
                for event in _run(engine, prepared, index, ticket, cancel):
                    ticket.ensure_open()
                    if isinstance(event, TextPiece):
                        texts.append(event.text)
                        logprobs.extend(event.logprobs or ())
                    else:
                        finished = event
                if finished is None:  # the cancel event was set
                    raise GenerationCancelledError("generation was cancelled")
                message, reason = prepared.output.finalize("".join(texts), finished.reason)
                if message.content is not None and not message.tool_calls and not message.function_call:
                    engine.remember_generation(prepared.reply_place, message.content, finished.token_ids)
                completion_tokens += finished.completion_tokens
                choices.append(Choice(index=index, message=message, finish_reason=reason,
                                      logprobs=ChoiceLogprobs(content=_content_logprobs(logprobs, message))
                                      if prepared.request.logprobs else None))
    prompt_tokens = len(prepared.prompt)
    return CompletionResponse(
        id=_new_id(), created=int(time.time()), model=prepared.model_name, choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
        system_fingerprint=engine.fingerprint,
    )


def _content_logprobs(entries: list[TokenLogprob], message: Message) -> list[TokenLogprob] | None:
    """The entries of the tokens that spell ``message.content``, as OpenAI's ``logprobs.content``
    is: neither a tool call's tokens (its envelope, its arguments), a stop string's nor the end of
    turn are content."""
    if message.content is None:
        return None
    queue = _ContentLogprobs()
    queue.add(entries)
    return queue.take(message.content)


class _ContentLogprobs:
    """Logprob entries waiting for the content they spell: a stream's content deltas take the
    entries of their bytes (a character may span two tokens, a token two deltas); what no content
    takes (a tool call, a stop string, the end of turn) is never sent."""

    def __init__(self) -> None:
        self._waiting: deque[TokenLogprob] = deque()
        self._ahead = 0  # bytes of entries already taken past the content sent so far

    def add(self, entries: list[TokenLogprob] | None) -> None:
        self._waiting.extend(entries or ())

    def take(self, content: str | None) -> list[TokenLogprob] | None:
        if not content:
            return None
        budget = len(content.encode("utf-8")) - self._ahead
        taken: list[TokenLogprob] = []
        while self._waiting and budget > 0:
            entry = self._waiting.popleft()
            taken.append(entry)
            budget -= len(entry.bytes or ())
        self._ahead = max(0, -budget)
        return taken


def _stepped(ticket: Ticket, events: Iterator[TextPiece | Finished]) -> Iterator[TextPiece | Finished]:
    """The decode loop's events, each computed under the model's step lock, none held across a yield."""
    try:
        while True:
            with ticket.step():
                event = next(events, None)
            if event is None:
                return
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def stream(engine: Engine, prepared: PreparedChat,
           cancel: threading.Event | None = None) -> Iterator[CompletionChunk]:
    """Chunks of the completion as they are generated.

    The model is leased from the first ``next()`` to the end, the close or the drop of the
    iterator, whichever thread advances it (see :mod:`local_llm_kit.lease`). Setting ``cancel``
    stops it before the next token and ends it without an error.
    """
    chunk_id, created = _new_id(), int(time.time())
    want_logprobs = prepared.request.logprobs

    def chunk(index: int, delta: Delta, reason: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> CompletionChunk:
        return CompletionChunk(
            id=chunk_id, created=created, model=prepared.model_name, system_fingerprint=engine.fingerprint,
            choices=[ChunkChoice(index=index, delta=delta, finish_reason=reason,  # type: ignore[arg-type]
                                 logprobs=ChoiceLogprobs(content=logprobs) if want_logprobs else None)],
        )

    completion_tokens = 0
    with engine.lease.generation(cancel) as ticket:
        if ticket is None:
            return
        for index in range(prepared.request.n):
            if cancel is not None and cancel.is_set():
                return
            shaper = prepared.output.stream_shaper()
            yield chunk(index, Delta(role="assistant", content=""))
            texts: list[str] = []
            entries = _ContentLogprobs()
            for event in _stepped(ticket, _run(engine, prepared, index, ticket, cancel)):
                if isinstance(event, TextPiece):
                    texts.append(event.text)
                    entries.add(event.logprobs)
                    for delta in shaper.feed(event.text):
                        yield chunk(index, delta, logprobs=entries.take(delta.content) if want_logprobs else None)
                else:
                    completion_tokens += event.completion_tokens
                    message, _ = prepared.output.finalize("".join(texts), event.reason)
                    if message.content is not None and not message.tool_calls and not message.function_call:
                        engine.remember_generation(prepared.reply_place, message.content, event.token_ids)
                    deltas, reason = shaper.finish(event.reason)
                    for delta in deltas:
                        yield chunk(index, delta, logprobs=entries.take(delta.content) if want_logprobs else None)
                    yield chunk(index, Delta(), reason)
    if cancel is not None and cancel.is_set():
        return
    if prepared.request.include_usage:
        prompt_tokens = len(prepared.prompt)
        yield CompletionChunk(
            id=chunk_id, created=created, model=prepared.model_name, system_fingerprint=engine.fingerprint,
            choices=[], usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                    total_tokens=prompt_tokens + completion_tokens),
        )
