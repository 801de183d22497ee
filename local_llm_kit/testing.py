"""Test helpers: a deterministic, weight-free backend for unit tests of code built on local_llm_kit.

:class:`FakeBackend` is a real :class:`~local_llm_kit.backends.base.Backend` over a byte-level
vocabulary (one token per byte, plus ChatML special tokens). Its "model" answers every turn with
a scripted reply: after an assistant header it puts all probability mass on the next byte of
the reply, then on ``<|im_end|>``. Everything above the backend (templates, the decode loop,
stop strings, streaming, constraints, memory, KV-prefix reuse) runs for real on it.

>>> from local_llm_kit.testing import fake_client
>>> client = fake_client(reply="Hello there!")
>>> client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content
'Hello there!'

A scripted tool call is written as the model would write it in the fake's ChatML format,
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``:

>>> call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
>>> tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
...     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
>>> reply = fake_client(reply=call).chat.completions.create(
...     messages=[{"role": "user", "content": "2 + 3?"}], tools=tools, tool_choice="required")
>>> reply.choices[0].message.tool_calls[0].function.arguments
'{"a": 2, "b": 3}'

Under a grammar (``tools``, ``response_format``) the script is followed only where the grammar
allows it, as a real model's choices are: a script that is not a valid call (bare JSON without
the tags, say) yields a well-formed call whose values the grammar chose, not the script's.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, overload

import numpy as np

from local_llm_kit.backends.base import Backend, ModelInfo, output_rows
from local_llm_kit.engine import Engine
from local_llm_kit.models import ResolvedModel
from local_llm_kit.speculation import PassCosts

if TYPE_CHECKING:
    import llguidance

    from local_llm_kit.client import AsyncLLMClient, LLMClient

__all__ = ["CHATML_TEMPLATE", "FakeBackend", "FixedPassCosts", "fake_client"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_ASSISTANT_HEADER = [256 + SPECIAL_TOKENS.index("<|im_start|>"), *b"assistant\n"]

Reply = str | Callable[[str], str]


class FakeBackend(Backend):
    """A byte-level fake model that replies with ``reply`` (a string, or a function of the prompt text).

    ``forward_calls`` records how many tokens each forward pass evaluated, so tests can check
    KV-prefix reuse. Logits are 0 for the scripted token and -10 for every other token, so
    sampling at any temperature still produces the script while penalties and biases can move it.
    ``delay_s`` makes each forward pass take that long, for tests of streaming, cancellation and
    concurrency; two forward passes running at once (a broken lock) raise ``RuntimeError``.
    ``kv_slots`` is how many sequences its "KV cache" keeps (see :mod:`local_llm_kit.slots`).
    """

    name = "fake"
    END_OF_TURN = 256 + SPECIAL_TOKENS.index("<|im_end|>")

    def __init__(self, reply: Reply = "Hello!", *, n_ctx: int = 2048, chat_template: str | None = CHATML_TEMPLATE,
                 architecture: str = "fake", delay_s: float = 0.0, kv_slots: int = 1) -> None:
        super().__init__(kv_slots)
        self.reply = reply
        self.delay_s = delay_s
        self._in_forward = threading.Lock()
        self._n_ctx = n_ctx
        self._info = ModelInfo(
            path="fake", architecture=architecture, n_vocab=256 + len(SPECIAL_TOKENS), n_ctx_train=n_ctx,
            eos_token_ids=frozenset({256, self.END_OF_TURN}), bos_token="", eos_token="<|im_end|>",
            chat_template=chat_template,
        )
        self.forward_calls: list[int] = []
        self._llg: llguidance.LLTokenizer | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in _SPECIAL_RE.finditer(text):
            ids.extend(text[pos:match.start()].encode())
            ids.append(256 + SPECIAL_TOKENS.index(match.group()))
            pos = match.end()
        ids.extend(text[pos:].encode())
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else SPECIAL_TOKENS[token_id - 256].encode()

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._llg is None:
            import llguidance

            backend = self

            class _Vocab:
                eos_token_id = self.END_OF_TURN
                bos_token_id = None
                tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [
                    b"\xff" + t.encode() for t in SPECIAL_TOKENS]
                special_token_ids: ClassVar[list[int]] = [256 + i for i in range(len(SPECIAL_TOKENS))]

                def __call__(self, text: bytes) -> list[int]:
                    return backend.tokenize(text.decode("utf-8", errors="replace"))

            self._llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))
        return self._llg

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        last: np.ndarray = self._evaluate(tokens, all_positions=False)[-1]
        return last

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        wanted = output_rows(tokens, rows)
        return self._evaluate(tokens, all_positions=True)[wanted]

    def _evaluate(self, tokens: Sequence[int], *, all_positions: bool) -> np.ndarray:
        if not tokens:
            raise ValueError("forward needs at least one token")
        if len(self._cached) + len(tokens) > self._n_ctx:
            raise ValueError("context overflow")
        if not self._in_forward.acquire(blocking=False):
            raise RuntimeError("two forward passes ran at once on one KV cache")
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            self.forward_calls.append(len(tokens))
            if not all_positions:
                self._cached.extend(tokens)
                return self._next_logits()[None]
            rows = []
            for token in tokens:
                self._cached.append(token)
                rows.append(self._next_logits())
            return np.stack(rows)
        finally:
            self._in_forward.release()

    def truncate_cache(self, n_keep: int) -> int:
        del self._cached[n_keep:]
        return len(self._cached)

    def _next_logits(self) -> np.ndarray:
        history = self._cached
        start = _last_header_end(history)
        logits = np.full(self._info.n_vocab, -10.0, dtype=np.float32)
        if start is None:
            logits[self.END_OF_TURN] = 0.0
            return logits
        prompt_text = b"".join(self.token_bytes(t) for t in history[:start]).decode("utf-8", errors="replace")
        target = (self.reply(prompt_text) if callable(self.reply) else self.reply).encode()
        produced = history[start:]
        if len(produced) < len(target) and list(target[: len(produced)]) == produced:
            logits[target[len(produced)]] = 0.0
        else:
            logits[self.END_OF_TURN] = 0.0
        return logits


def _last_header_end(history: Sequence[int]) -> int | None:
    n = len(_ASSISTANT_HEADER)
    for end in range(len(history), n - 1, -1):
        if list(history[end - n:end]) == _ASSISTANT_HEADER:
            return end
    return None


def fake_engine(backend: FakeBackend | None = None) -> Engine:
    """An :class:`Engine` over a :class:`FakeBackend`, not registered in the shared engine cache."""
    backend = backend or FakeBackend()
    return Engine(ResolvedModel("fake-model", Path("fake"), "fake"), "fake", backend)


class FixedPassCosts(PassCosts):
    """Forward-pass costs that do not depend on the machine, for tests of speculation itself.

    Speculation verifies a draft only where the engine's measured pass costs say it pays (see
    :class:`~local_llm_kit.speculation.PassCosts`); timings vary from run to run, and the fake
    backend's passes cost per position about what a CPU's do. Set one on the engine to make
    the decision depend on the acceptance rate alone::

        client.engine.pass_costs = FixedPassCosts(extra_share=0.0)  # every draft is verified
    """

    def __init__(self, extra_share: float = 0.1) -> None:
        super().__init__()
        self._share = extra_share

    def record(self, positions: int, seconds: float, rows: int | None = None) -> None:
        return None

    def shares(self, positions: int) -> list[float]:
        return [1.0 + self._share * n for n in range(positions)]


@overload
def fake_client(reply: Reply = ..., *, backend: FakeBackend | None = ..., asynchronous: Literal[False] = ...,
                **client_kwargs: Any) -> LLMClient: ...


@overload
def fake_client(reply: Reply = ..., *, backend: FakeBackend | None = ..., asynchronous: Literal[True],
                **client_kwargs: Any) -> AsyncLLMClient: ...


@overload
def fake_client(reply: Reply = ..., *, backend: FakeBackend | None = ..., asynchronous: bool,
                **client_kwargs: Any) -> LLMClient | AsyncLLMClient: ...


def fake_client(reply: Reply = "Hello!", *, backend: FakeBackend | None = None, asynchronous: bool = False,
                **client_kwargs: Any) -> LLMClient | AsyncLLMClient:
    """A client whose model is a :class:`FakeBackend`; no weights are read.

    ``client_kwargs`` are :class:`~local_llm_kit.LLMClient`'s; ``context_length`` is the fake
    model's context (with ``backend=``, it must be that backend's ``n_ctx``).
    """
    from local_llm_kit.client import AsyncLLMClient, LLMClient
    from local_llm_kit.errors import InvalidRequestError

    client_class = AsyncLLMClient if asynchronous else LLMClient
    client = client_class("fake-model", **client_kwargs)
    n_ctx = client.settings.context_length
    if backend is not None and "context_length" in client_kwargs and backend.n_ctx != n_ctx:
        raise InvalidRequestError(f"context_length={n_ctx} disagrees with the given backend's n_ctx="
                                  f"{backend.n_ctx}: pass one of them", param="context_length")
    engine = fake_engine(backend or FakeBackend(reply, n_ctx=n_ctx))
    client._resolved = engine.model
    client._engine = engine
    return client
