"""A reusable contract for LlamaIndex LLMs, as pytest tests: subclass it and provide an ``llm`` fixture.

LlamaIndex has no standard test suite for LLM integrations; this is one. It checks what
LlamaIndex's query engines, chat engines and agents rely on: every method sync and async,
streamed deltas adding up to the final message, tool calls forced and optional (with arguments
valid for the tool's schema), structured output, metadata, callback and instrumentation events,
token usage, and that the caller's chat history is never changed.

>>> import pytest
>>> from llama_index.llms.local_llm_kit.contract import LLMContractTests
>>> @pytest.fixture(scope="module")  # built once; a class-scoped method fixture is deprecated in pytest 9
... def my_llm():
...     return MyLLM(temperature=0, max_tokens=32)
>>> class TestMyLLM(LLMContractTests):
...     @pytest.fixture
...     def llm(self, my_llm):
...         return my_llm

Async tests are marked ``pytest.mark.asyncio`` (pytest-asyncio). Tests of tools and structured
output need a ``FunctionCallingLLM``; set ``supports_tools = False`` or
``supports_structured_output = False`` to mark them as expected failures with that reason.
Tests check behaviour, not answers: a forced tool call must be a call of that tool with valid
arguments, not the right arithmetic.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.callbacks.token_counting import get_tokens_from_response
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index_instrumentation import get_dispatcher
from pydantic import BaseModel, Field

__all__ = ["LLMContractTests"]


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


class Person(BaseModel):
    """A person: name and age."""

    # Bounded fields keep any model's constrained output short enough to finish.
    name: str = Field(max_length=24, description="first name")
    age: int = Field(ge=0, le=150)


class _Events(BaseEventHandler):
    """Records instrumentation events by class name."""

    seen: list[str] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "ContractEvents"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.seen.append(type(event).__name__)


class _Callbacks(BaseCallbackHandler):
    """Records legacy callback events (start, end) of the LLM type."""

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.starts = 0
        self.ends = 0

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                       parent_id: str = "", **kwargs: Any) -> str:
        if event_type == CBEventType.LLM:
            self.starts += 1
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                     **kwargs: Any) -> None:
        if event_type == CBEventType.LLM:
            self.ends += 1

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        return None


def _user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


class LLMContractTests:
    """The contract. Subclasses provide the ``llm`` fixture (greedy, a short ``max_tokens``)."""

    supports_tools: ClassVar[bool] = True
    supports_structured_output: ClassVar[bool] = True
    #: The same output streamed and not (true of greedy decoding).
    deterministic: ClassVar[bool] = True
    #: ``llm_kwargs`` under which no valid Person can be produced (the result must raise, not return).
    truncating_llm_kwargs: ClassVar[dict[str, Any]] = {"max_tokens": 3}
    #: A prompt with a short answer keeps the suite fast on any model.
    prompt: ClassVar[str] = "Say hello in one word."

    @pytest.fixture
    def llm(self) -> LLM:
        pytest.fail("subclass LLMContractTests and override its `llm` fixture with the LLM under test")

    @pytest.fixture
    def tools(self) -> list[FunctionTool]:
        return [FunctionTool.from_defaults(fn=add), FunctionTool.from_defaults(fn=multiply)]

    def _needs_tools(self, llm: LLM) -> FunctionCallingLLM:
        if not self.supports_tools or not isinstance(llm, FunctionCallingLLM):
            pytest.xfail("this LLM declares no tool calling")
        return llm

    def _needs_structured(self) -> None:
        if not self.supports_structured_output:
            pytest.xfail("this LLM declares no structured output")

    # -- metadata -------------------------------------------------------------------------
    def test_metadata(self, llm: LLM) -> None:
        meta = llm.metadata
        assert isinstance(meta.context_window, int) and meta.context_window > 0
        assert isinstance(meta.num_output, int) and 0 < meta.num_output < meta.context_window
        assert meta.model_name
        assert meta.is_chat_model is True
        if self.supports_tools:
            assert meta.is_function_calling_model is True

    # -- sync -----------------------------------------------------------------------------
    def test_chat(self, llm: LLM) -> None:
        response = llm.chat([_user(self.prompt)])
        assert isinstance(response, ChatResponse)
        assert response.message.role == MessageRole.ASSISTANT
        assert isinstance(response.message.content, str) and response.message.content.strip()

    def test_complete(self, llm: LLM) -> None:
        response = llm.complete(self.prompt)
        assert isinstance(response, CompletionResponse)
        assert response.text.strip()

    def test_stream_chat_deltas_add_up(self, llm: LLM) -> None:
        self._check_chat_stream(list(llm.stream_chat([_user(self.prompt)])))

    def test_stream_complete_deltas_add_up(self, llm: LLM) -> None:
        self._check_completion_stream(list(llm.stream_complete(self.prompt)))

    def test_stream_matches_non_stream(self, llm: LLM) -> None:
        if not self.deterministic:
            pytest.xfail("this LLM declares no deterministic decoding")
        streamed = list(llm.stream_chat([_user(self.prompt)]))
        assert streamed[-1].message.content == llm.chat([_user(self.prompt)]).message.content

    def test_usage_reported(self, llm: LLM) -> None:
        prompt_tokens, completion_tokens = get_tokens_from_response(llm.chat([_user(self.prompt)]))
        assert prompt_tokens > 0 and completion_tokens > 0
        last = list(llm.stream_chat([_user(self.prompt)]))[-1]
        assert get_tokens_from_response(last) == (prompt_tokens, completion_tokens)

    # -- async ----------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_achat(self, llm: LLM) -> None:
        response = await llm.achat([_user(self.prompt)])
        assert isinstance(response, ChatResponse)
        assert isinstance(response.message.content, str) and response.message.content.strip()

    @pytest.mark.asyncio
    async def test_acomplete(self, llm: LLM) -> None:
        response = await llm.acomplete(self.prompt)
        assert isinstance(response, CompletionResponse) and response.text.strip()

    @pytest.mark.asyncio
    async def test_astream_chat_deltas_add_up(self, llm: LLM) -> None:
        self._check_chat_stream(await _collect(await llm.astream_chat([_user(self.prompt)])))

    @pytest.mark.asyncio
    async def test_astream_complete_deltas_add_up(self, llm: LLM) -> None:
        self._check_completion_stream(await _collect(await llm.astream_complete(self.prompt)))

    @pytest.mark.asyncio
    async def test_async_runs_off_the_event_loop(self, llm: LLM) -> None:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.ensure_future(ticker())
        try:
            await llm.achat([_user(self.prompt)])
        finally:
            done.set()
            await tick_task
        assert ticks > 1, "the event loop was blocked while the LLM generated"

    @pytest.mark.asyncio
    async def test_achat_cancellation_leaves_llm_usable(self, llm: LLM) -> None:
        task = asyncio.ensure_future(llm.achat([_user("Write a very long story about the sea.")]))
        await asyncio.sleep(0.05)  # let generation start
        assert not task.done(), "the reply finished before it could be cancelled: raise max_tokens"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await llm.achat([_user(self.prompt)])).message.content

    @pytest.mark.asyncio
    async def test_astream_closed_early_leaves_llm_usable(self, llm: LLM) -> None:
        stream = await llm.astream_chat([_user("Write a very long story about the sea.")])
        first = await stream.__anext__()
        assert isinstance(first, ChatResponse)
        await stream.aclose()
        assert (await llm.achat([_user(self.prompt)])).message.content

    # -- tools ----------------------------------------------------------------------------
    def test_tool_call_forced(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = fc.chat_with_tools(tools[:1], user_msg="What is 2 plus 3?", tool_required=True)
        self._check_calls(fc, response, tools, expect_name="add")

    def test_tool_choice_by_name(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = fc.chat_with_tools(tools, user_msg="What is 2 plus 3?", tool_choice="multiply")
        self._check_calls(fc, response, tools, expect_name="multiply")

    def test_tool_choice_none(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = fc.chat_with_tools(tools, user_msg="What is 2 plus 3?", tool_choice="none")
        assert fc.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
        assert isinstance(response.message.content, str)
        with pytest.raises(ValueError):
            fc.get_tool_calls_from_response(response, error_on_no_tool_call=True)

    def test_tool_optional(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = fc.chat_with_tools(tools, user_msg="What is 2 plus 3?")
        calls = fc.get_tool_calls_from_response(response, error_on_no_tool_call=False)
        if calls:
            self._check_calls(fc, response, tools)
        else:
            assert isinstance(response.message.content, str) and response.message.content.strip()

    def test_no_parallel_calls_when_disallowed(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = fc.chat_with_tools(tools, user_msg="Add 2 and 3, and multiply 4 by 5.", tool_required=True,
                                      allow_parallel_tool_calls=False)
        assert len(fc.get_tool_calls_from_response(response)) == 1

    def test_stream_chat_with_tools_forced(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        chunks = list(fc.stream_chat_with_tools(tools[:1], user_msg="What is 2 plus 3?", tool_required=True))
        self._check_tool_stream(fc, chunks, tools)

    @pytest.mark.asyncio
    async def test_achat_with_tools_forced(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        response = await fc.achat_with_tools(tools[:1], user_msg="What is 2 plus 3?", tool_required=True)
        self._check_calls(fc, response, tools, expect_name="add")

    @pytest.mark.asyncio
    async def test_astream_chat_with_tools_forced(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        stream = await fc.astream_chat_with_tools(tools[:1], user_msg="What is 2 plus 3?", tool_required=True)
        self._check_tool_stream(fc, await _collect(stream), tools)

    def test_tool_result_round_trip(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        history = [
            _user("What is 2 plus 3?"),
            ChatMessage(role=MessageRole.ASSISTANT,
                        blocks=[ToolCallBlock(tool_call_id="call_1", tool_name="add", tool_kwargs={"a": 2, "b": 3})]),
            ChatMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": "call_1"}),
        ]
        response = fc.chat_with_tools(tools, chat_history=history, tool_choice="none")
        assert isinstance(response.message.content, str) and response.message.content.strip()

    def test_legacy_tool_calls_are_read(self, llm: LLM) -> None:
        fc = self._needs_tools(llm)
        legacy = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={
            "tool_calls": [{"id": "call_9", "type": "function",
                            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}))
        [call] = fc.get_tool_calls_from_response(legacy)
        assert (call.tool_id, call.tool_name, call.tool_kwargs) == ("call_9", "add", {"a": 1, "b": 2})

    def test_predict_and_call(self, llm: LLM, tools: list[FunctionTool]) -> None:
        fc = self._needs_tools(llm)
        output = fc.predict_and_call(tools[:1], user_msg="What is 2 plus 3?", tool_required=True)
        [source] = output.sources
        assert source.tool_name == "add"
        assert source.content == str(add(**source.raw_input["kwargs"]))

    # -- structured output --------------------------------------------------------------------
    _person_prompt = PromptTemplate("Invent a person called {name} and give their age.")

    def test_structured_predict(self, llm: LLM) -> None:
        self._needs_structured()
        assert isinstance(llm.structured_predict(Person, self._person_prompt, name="Ada"), Person)

    @pytest.mark.asyncio
    async def test_astructured_predict(self, llm: LLM) -> None:
        self._needs_structured()
        assert isinstance(await llm.astructured_predict(Person, self._person_prompt, name="Ada"), Person)

    def test_stream_structured_predict(self, llm: LLM) -> None:
        self._needs_structured()
        items = list(llm.stream_structured_predict(Person, self._person_prompt, name="Ada"))
        assert items and all(isinstance(item, BaseModel) for item in items)
        assert isinstance(items[-1], Person)

    @pytest.mark.asyncio
    async def test_astream_structured_predict(self, llm: LLM) -> None:
        self._needs_structured()
        items = await _collect(await llm.astream_structured_predict(Person, self._person_prompt, name="Ada"))
        assert items and isinstance(items[-1], Person)

    def test_as_structured_llm(self, llm: LLM) -> None:
        self._needs_structured()
        response = llm.as_structured_llm(Person).chat([_user("Invent a person called Ada.")])
        assert isinstance(response.raw, Person)
        assert Person.model_validate_json(response.message.content or "") == response.raw

    def test_structured_predict_invalid_result_raises(self, llm: LLM) -> None:
        self._needs_structured()
        with pytest.raises(ValueError):
            llm.structured_predict(Person, self._person_prompt, llm_kwargs=dict(self.truncating_llm_kwargs),
                                   name="Ada")

    # -- events ---------------------------------------------------------------------------------
    def test_instrumentation_events(self, llm: LLM) -> None:
        events = _Events()
        root = get_dispatcher()
        root.add_event_handler(events)
        try:
            llm.chat([_user(self.prompt)])
            list(llm.stream_chat([_user(self.prompt)]))
            llm.complete(self.prompt)
        finally:
            root.event_handlers.remove(events)
        for name in ("LLMChatStartEvent", "LLMChatInProgressEvent", "LLMChatEndEvent",
                     "LLMCompletionStartEvent", "LLMCompletionEndEvent"):
            assert name in events.seen, f"{name} was not dispatched"
        assert events.seen.count("LLMChatStartEvent") >= 2

    @pytest.mark.asyncio
    async def test_callback_handlers(self, llm: LLM) -> None:
        handler = _Callbacks()
        previous = llm.callback_manager
        llm.callback_manager = CallbackManager([handler])
        try:
            llm.chat([_user(self.prompt)])
            await llm.achat([_user(self.prompt)])
            list(llm.stream_chat([_user(self.prompt)]))
            await _collect(await llm.astream_chat([_user(self.prompt)]))
        finally:
            llm.callback_manager = previous
        assert handler.starts >= 4 and handler.ends >= 4

    # -- the caller's data ------------------------------------------------------------------------
    def test_history_not_mutated(self, llm: LLM, tools: list[FunctionTool]) -> None:
        history = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), _user("Hi"),
                   ChatMessage(role=MessageRole.ASSISTANT, content="Hello!"), _user(self.prompt)]
        snapshot = copy.deepcopy([m.model_dump() for m in history])
        llm.chat(history)
        list(llm.stream_chat(history))
        if self.supports_structured_output:
            llm.structured_predict(Person, ChatPromptTemplate(message_templates=history))
        if self.supports_tools and isinstance(llm, FunctionCallingLLM):
            llm.chat_with_tools(tools, user_msg="What is 2 plus 3?", chat_history=history)
            list(llm.stream_chat_with_tools(tools, user_msg="And 4 times 5?", chat_history=history))
        assert [m.model_dump() for m in history] == snapshot

    # -- checks -------------------------------------------------------------------------------------
    @staticmethod
    def _check_chat_stream(chunks: list[ChatResponse]) -> None:
        assert chunks, "the stream produced nothing"
        text = ""
        for chunk in chunks:
            assert isinstance(chunk, ChatResponse)
            text += chunk.delta or ""
            assert (chunk.message.content or "") == text, "a chunk's message is not the deltas so far"
        assert text.strip()
        assert all(isinstance(b, TextBlock) for b in chunks[-1].message.blocks)

    @staticmethod
    def _check_completion_stream(chunks: list[CompletionResponse]) -> None:
        assert chunks, "the stream produced nothing"
        text = ""
        for chunk in chunks:
            text += chunk.delta or ""
            assert chunk.text == text
        assert text.strip()

    @staticmethod
    def _check_calls(llm: FunctionCallingLLM, response: ChatResponse, tools: list[FunctionTool],
                     expect_name: str | None = None) -> None:
        calls = llm.get_tool_calls_from_response(response)
        assert calls, "no tool call"
        by_name = {tool.metadata.name: tool for tool in tools}
        for call in calls:
            if expect_name is not None:
                assert call.tool_name == expect_name
            assert call.tool_name in by_name
            schema = by_name[call.tool_name].metadata.fn_schema
            assert schema is not None
            schema.model_validate(call.tool_kwargs)  # arguments valid for the tool's schema
            assert call.tool_id, "a tool call needs an id for its result to refer to"

    def _check_tool_stream(self, llm: FunctionCallingLLM, chunks: list[ChatResponse],
                           tools: list[FunctionTool]) -> None:
        assert chunks
        counts = [len(llm.get_tool_calls_from_response(c, error_on_no_tool_call=False)) for c in chunks]
        assert counts == sorted(counts), "tool calls disappeared from a later chunk"
        self._check_calls(llm, chunks[-1], tools, expect_name="add")


async def _collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]
