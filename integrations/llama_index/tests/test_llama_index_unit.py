"""The LlamaIndex adapter's plumbing on local_llm_kit's weight-free fake backend (fast, deterministic)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.local_llm_kit import LocalLLMKit, LocalLLMKitMemory, StructuredOutputError
from llama_index.llms.local_llm_kit._convert import message_from_openai, to_openai_messages
from pydantic import BaseModel, Field, field_validator

from local_llm_kit import GenerationTimeoutError, InvalidRequestError
from local_llm_kit.testing import FakeBackend, fake_client


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


ADD = FunctionTool.from_defaults(fn=add)
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int


def make_llm(reply: str = "Hello there!", **kwargs: Any) -> LocalLLMKit:
    backend = FakeBackend(reply)
    return LocalLLMKit(client=fake_client(backend=backend, temperature=0),
                       async_client=fake_client(backend=backend, temperature=0, asynchronous=True), **kwargs)


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


# -- messages --------------------------------------------------------------------------------
def test_messages_convert_with_tool_calls_in_both_forms() -> None:
    history = [
        user("2+3?"),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                            tool_kwargs={"a": 2, "b": 3})]),
        ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}]}),
    ]
    out = to_openai_messages(history)
    assert out[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}
    assert out[2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}
    assert out[3]["tool_calls"][0]["id"] == "c2"
    back = message_from_openai(out[1])
    assert back.blocks == [ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 2, "b": 3})]


def test_tool_result_without_call_id_raises() -> None:
    with pytest.raises(InvalidRequestError) as error:
        to_openai_messages([ChatMessage(role="tool", content="5")])
    assert error.value.param == "messages[0].tool_call_id"


def test_non_text_block_raises() -> None:
    image = ChatMessage(role="user", blocks=[TextBlock(text="look"), ImageBlock(url="http://x/y.png")])
    with pytest.raises(InvalidRequestError, match="ImageBlock"):
        make_llm().chat([image])


# -- parameters --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "param"), [({"stream": True}, "stream"), ({"n": 2}, "n"),
                                               ({"bogus": 1}, "bogus"), ({"audio": {"x": 1}}, "audio")])
def test_bad_parameters_raise(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        make_llm().chat([user("hi")], **kwargs)
    assert error.value.param == param


@pytest.mark.parametrize(("name", "hint"), [("context_window", "context_length"), ("temprature", "temperature"),
                                             ("request_timeout", "timeout"), ("model_kwargs", "additional_kwargs")])
def test_unknown_fields_raise_with_the_field_meant(name: str, hint: str) -> None:
    # pydantic would drop them without a word: the setting would silently do nothing
    with pytest.raises(InvalidRequestError, match=f"did you mean '{hint}'") as error:
        LocalLLMKit(**{name: 1})
    assert error.value.param == name


def test_settings_that_need_a_server_raise_at_construction() -> None:
    with pytest.raises(InvalidRequestError, match="retrying a failed HTTP request") as error:
        LocalLLMKit(max_retries=3)
    assert error.value.param == "max_retries"


def test_timeout_stops_an_in_process_call() -> None:
    def slow(prompt: str) -> str:
        time.sleep(0.02)
        return "word " * 100

    backend = FakeBackend(slow)
    llm = LocalLLMKit(client=fake_client(backend=backend, temperature=0), timeout=0.1)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError, match=r"timeout of 0\.1 s"):
        llm.complete("hi")
    assert time.monotonic() - started < 2.0  # stopped, not run to the reply's 500 steps (10 s)


def test_one_llm_event_per_call() -> None:
    # complete() and its kin go through chat(): LlamaIndex's token counter must see one event, not two
    llm = make_llm()
    counter = TokenCountingHandler(tokenizer=lambda text: list(text.encode()))
    llm.callback_manager = CallbackManager([counter])
    calls = {"chat": lambda: llm.chat([user("hi")]), "complete": lambda: llm.complete("hi"),
             "stream_complete": lambda: list(llm.stream_complete("hi")),
             "acomplete": lambda: asyncio.run(llm.acomplete("hi"))}
    usage = llm.chat([user("hi")]).raw["usage"]
    for name, call in calls.items():
        counter.reset_counts()
        call()
        assert len(counter.llm_token_counts) == 1, name
        event = counter.llm_token_counts[0]
        assert (event.prompt_token_count, event.completion_token_count) == (usage["prompt_tokens"],
                                                                           usage["completion_tokens"]), name


def test_client_with_memory_enabled_raises() -> None:
    client = fake_client(reply="x")
    client.enable_memory(100)
    with pytest.raises(InvalidRequestError, match="memory"):
        LocalLLMKit(client=client).chat([user("hi")])


def test_client_and_settings_together_raise() -> None:
    with pytest.raises(InvalidRequestError) as error:
        LocalLLMKit(client=fake_client(), context_length=512)
    assert error.value.param == "context_length"


# -- chat and streams ------------------------------------------------------------------------------
def test_chat_reports_usage_where_llama_index_reads_it() -> None:
    response = make_llm().chat([user("hi")])
    assert response.message.content == "Hello there!"
    usage = response.raw["usage"]
    assert usage["completion_tokens"] == len(b"Hello there!") + 1  # bytes + end of turn
    assert response.additional_kwargs == usage


def test_stream_chat_deltas_and_usage() -> None:
    chunks = list(make_llm().stream_chat([user("hi")]))
    assert "".join(c.delta or "" for c in chunks) == "Hello there!"
    assert [c.message.content for c in chunks if c.delta][-1] == "Hello there!"
    assert chunks[-1].additional_kwargs["completion_tokens"] > 0


def test_stream_chat_carries_the_logprobs_chat_gives() -> None:
    llm = make_llm()
    expected = llm.chat([user("hi")], logprobs=True, top_logprobs=2).logprobs
    streamed = list(llm.stream_chat([user("hi")], logprobs=True, top_logprobs=2))
    assert expected is not None and len(expected) == len(b"Hello there!")  # the content's; not the end of turn
    assert streamed[-1].logprobs == expected
    assert list(llm.stream_complete("hi", logprobs=True, top_logprobs=2))[-1].logprobs == expected


async def test_async_forms() -> None:
    llm = make_llm()
    assert (await llm.achat([user("hi")])).message.content == "Hello there!"
    assert (await llm.acomplete("hi")).text == "Hello there!"
    chunks = [c async for c in await llm.astream_complete("hi")]
    assert chunks[-1].text == "Hello there!"


# -- tools ---------------------------------------------------------------------------------------
def test_forced_tool_call_and_stream_carry_calls_so_far() -> None:
    llm = make_llm(CALL)
    response = llm.chat_with_tools([ADD], user_msg="2+3?", tool_required=True)
    [selection] = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("add", {"a": 2, "b": 3})
    assert selection.tool_id
    chunks = list(llm.stream_chat_with_tools([ADD], user_msg="2+3?", tool_required=True))
    counts = [len(llm.get_tool_calls_from_response(c, error_on_no_tool_call=False)) for c in chunks]
    assert counts[-1] == 1 and counts == sorted(counts)
    assert llm.get_tool_calls_from_response(chunks[-1])[0].tool_kwargs == {"a": 2, "b": 3}


@pytest.mark.parametrize(("choice", "required", "expected"), [
    (None, False, "auto"), (None, True, "required"), ("none", False, "none"),
    ("add", False, {"type": "function", "function": {"name": "add"}}),
    ({"type": "function", "function": {"name": "add"}}, True, {"type": "function", "function": {"name": "add"}}),
])
def test_tool_choice_translation(choice: Any, required: bool, expected: Any) -> None:
    kwargs = make_llm()._prepare_chat_with_tools([ADD], user_msg="x", tool_choice=choice, tool_required=required)
    assert kwargs["tool_choice"] == expected
    assert kwargs["parallel_tool_calls"] is False


@pytest.mark.parametrize(("choice", "required"), [("nope", False), ("none", True), ("auto", True), (3, False)])
def test_bad_tool_choice_raises(choice: Any, required: bool) -> None:
    with pytest.raises(InvalidRequestError) as error:
        make_llm()._prepare_chat_with_tools([ADD], user_msg="x", tool_choice=choice, tool_required=required)
    assert error.value.param == "tool_choice"


def test_required_tool_without_tools_raises() -> None:
    with pytest.raises(InvalidRequestError):
        make_llm()._prepare_chat_with_tools([], user_msg="x", tool_required=True)


def test_chat_history_is_not_mutated() -> None:
    history = [user("hello"), ChatMessage(role="assistant", content="hi")]
    snapshot = copy.deepcopy([m.model_dump() for m in history])
    llm = make_llm(CALL)
    llm.chat_with_tools([ADD], user_msg="2+3?", chat_history=history)
    list(llm.stream_chat_with_tools([ADD], user_msg="2+3?", chat_history=history))
    llm.predict_and_call([ADD], user_msg="2+3?", chat_history=history)
    assert [m.model_dump() for m in history] == snapshot


def test_predict_and_call_runs_the_tool() -> None:
    output = make_llm(CALL).predict_and_call([ADD], user_msg="2+3?", tool_required=True)
    assert output.response == "5"


# -- structured output ------------------------------------------------------------------------------
PROMPT = PromptTemplate("Invent {who}.")


def test_structured_predict_constrained() -> None:
    llm = make_llm('{"name": "Ada", "age": 36}')
    assert llm.structured_predict(Person, PROMPT, who="Ada") == Person(name="Ada", age=36)
    items = list(llm.stream_structured_predict(Person, PROMPT, who="Ada"))
    assert items[-1] == Person(name="Ada", age=36)


async def test_astructured_predict_and_structured_llm() -> None:
    llm = make_llm('{"name": "Ada", "age": 36}')
    assert await llm.astructured_predict(Person, PROMPT, who="Ada") == Person(name="Ada", age=36)
    items = [i async for i in await llm.astream_structured_predict(Person, PROMPT, who="Ada")]
    assert items[-1] == Person(name="Ada", age=36)
    response = llm.as_structured_llm(Person).chat([user("Ada")])
    assert json.loads(response.message.content or "") == {"name": "Ada", "age": 36}


class Tagged(BaseModel):
    name: str
    tags: set[str]  # its schema says uniqueItems: checked after decoding, not a grammar


class Even(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _even(cls, value: int) -> int:  # a rule no JSON schema states
        if value % 2:
            raise ValueError("n must be even")
        return value


async def test_structured_output_takes_classes_whose_schema_is_not_all_grammar() -> None:
    """Structured output used to send ``strict: true``, which refuses any class with a keyword the
    grammar cannot enforce (here ``uniqueItems``): now what can be enforced is, and pydantic judges
    the result, as with llama-index's OpenAI LLM (``strict=False``)."""
    reply = '{"name": "Ada", "tags": ["maths", "engines"]}'
    expected = Tagged(name="Ada", tags={"maths", "engines"})
    assert make_llm(reply).structured_predict(Tagged, PROMPT, who="Ada") == expected
    assert await make_llm(reply).astructured_predict(Tagged, PROMPT, who="Ada") == expected
    structured = json.loads(make_llm(reply).as_structured_llm(Tagged).chat([user("Ada")]).message.content or "")
    assert Tagged.model_validate(structured) == expected  # some llama-index versions write the set back, unordered
    with pytest.raises(StructuredOutputError, match="not a valid Even"):  # pydantic still has the last word
        make_llm('{"n": 3}').structured_predict(Even, PROMPT, who="Ada")


def test_schema_violations_reach_the_message() -> None:
    """The client reports a keyword checked after decoding that the reply breaks (uniqueItems) on
    ``message.schema_violations``; the adapter kept it only in ``raw``, and lost it when streaming."""
    schema = {"type": "object", "required": ["ids"], "additionalProperties": False,
              "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "Ids", "schema": schema}}
    llm = make_llm('{"ids": [1, 1]}')
    [violation] = llm.chat([user("ids?")], response_format=fmt).message.additional_kwargs["schema_violations"]
    assert "uniqueItems" in violation
    *_, last = llm.stream_chat([user("ids?")], response_format=fmt)
    assert last.message.additional_kwargs["schema_violations"] == [violation]
    assert "schema_violations" not in make_llm('{"ids": [1, 2]}').chat(
        [user("ids?")], response_format=fmt).message.additional_kwargs


def test_truncated_structured_output_raises() -> None:
    # 24 tokens fit the shortest valid Person (the core rejects a smaller budget up front) but not this one.
    long_reply = '{"name": "Adalovelac", "age": 136}'
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        make_llm(long_reply).structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 24}, who="Ada")
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        list(make_llm(long_reply).stream_structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 24}, who="Ada"))
    with pytest.raises(ValueError, match="max_tokens"):
        make_llm(long_reply).structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 4}, who="Ada")


def test_structured_output_conflicting_kwargs_raise() -> None:
    with pytest.raises(InvalidRequestError) as error:
        make_llm().structured_predict(Person, PROMPT, llm_kwargs={"response_format": {"type": "text"}}, who="x")
    assert error.value.param == "response_format"


# -- metadata -------------------------------------------------------------------------------------
def test_metadata() -> None:
    meta = make_llm(max_tokens=64).metadata
    assert (meta.num_output, meta.is_chat_model, meta.is_function_calling_model) == (64, True, True)
    assert meta.context_window == 2048 and meta.model_name == "fake-model"


# -- memory --------------------------------------------------------------------------------------
def test_memory_trims_to_budget_keeping_system_and_tool_pairs() -> None:
    llm = make_llm()
    memory = LocalLLMKitMemory.from_defaults(llm=llm, token_limit=400)
    memory.put(ChatMessage(role="system", content="You are terse."))
    for i in range(8):
        memory.put_messages([
            user(f"question {i}"),
            ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id=f"c{i}", tool_name="add",
                                                                tool_kwargs={"a": i, "b": i})]),
            ChatMessage(role="tool", content=str(2 * i), additional_kwargs={"tool_call_id": f"c{i}"}),
            ChatMessage(role="assistant", content=f"answer {i}"),
        ])
        assert memory.token_count() <= 400
    history = memory.get_all()
    assert history[0].role == MessageRole.SYSTEM
    assert memory.trimmed_total > 0
    assert history[-1].content == "answer 7"
    call_ids = [b.tool_call_id for m in history for b in m.blocks if isinstance(b, ToolCallBlock)]
    results = [m.additional_kwargs["tool_call_id"] for m in history if m.role == MessageRole.TOOL]
    assert call_ids == results
    assert memory.token_count() == llm.client.count_tokens(to_openai_messages(history))


def test_memory_get_leaves_room_for_initial_tokens() -> None:
    memory = LocalLLMKitMemory.from_defaults(llm=make_llm(), token_limit=300)
    for i in range(4):
        memory.put_messages([user(f"q{i}"), ChatMessage(role="assistant", content=f"a{i}")])
    whole = memory.get()
    fewer = memory.get(initial_token_count=250)
    assert len(fewer) < len(whole) and fewer == whole[len(whole) - len(fewer):]
    with pytest.raises(InvalidRequestError):
        memory.get(initial_token_count=301)


async def test_memory_async_and_reset() -> None:
    memory = LocalLLMKitMemory.from_defaults(llm=make_llm(), token_limit=300)
    await memory.aput(user("hi"))
    await memory.aset([user("a"), ChatMessage(role="assistant", content="b")])
    assert [m.content for m in await memory.aget()] == ["a", "b"]
    await memory.areset()
    assert await memory.aget_all() == []


def test_memory_survives_a_workflow_context_round_trip() -> None:
    """A workflow Context serializes its memory between two ``agent.run(ctx=ctx)``: before, the
    copy lost the model and every message (the second run raised "llm Field required")."""
    from workflows.context.serializers import JsonSerializer

    llm = make_llm()
    memory = LocalLLMKitMemory.from_defaults(llm=llm, token_limit=300)
    memory.put_messages([
        user("add 2 and 3"),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                            tool_kwargs={"a": 2, "b": 3})]),
        ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": "c1"}),
    ])
    serializer = JsonSerializer()
    saved = serializer.serialize(memory)  # what Context.to_dict() writes: JSON
    copy = serializer.deserialize(saved)
    assert isinstance(copy, LocalLLMKitMemory) and copy.token_limit == 300
    assert copy.get_all() == memory.get_all()
    copy.put(ChatMessage(role="assistant", content="5."))  # the agent's next turn, on the copy
    assert memory.get_all()[-1].content == "5.", "in one process the copy continues the user's history"

    elsewhere = json.loads(saved)["value"]  # another process: no live session of that id
    elsewhere["session_id"] = "restored-" + elsewhere["session_id"]
    restored = LocalLLMKitMemory.from_dict(elsewhere, llm=llm)
    assert [m.content for m in restored.get_all()] == ["add 2 and 3", None, "5"]
    [call] = [b for b in restored.get_all()[1].blocks if isinstance(b, ToolCallBlock)]
    assert (call.tool_call_id, call.tool_name, call.tool_kwargs) == ("c1", "add", {"a": 2, "b": 3})
    assert restored.token_count() == llm.client.count_tokens(to_openai_messages(restored.get_all()))
    with pytest.raises(InvalidRequestError) as error:
        LocalLLMKitMemory.from_dict(elsewhere, llm=llm, token_budget=10)
    assert error.value.param == "token_budget"


def test_memory_needs_local_llm_kit() -> None:
    with pytest.raises(InvalidRequestError) as error:
        LocalLLMKitMemory.from_defaults(llm=object(), token_limit=10)  # type: ignore[arg-type]
    assert error.value.param == "llm"


def test_tokenizer_fn_is_the_models() -> None:
    llm = make_llm()
    assert llm.tokenizer_fn("héllo") == llm.client.engine.backend.tokenize("héllo")


def test_responses_are_llama_index_types() -> None:
    assert isinstance(make_llm().chat([user("x")]), ChatResponse)
    assert asyncio.iscoroutinefunction(LocalLLMKit.achat)


def test_fields_configure_the_client_without_loading() -> None:
    llm = LocalLLMKit(context_length=512, max_tokens=100, temperature=0)
    assert llm.metadata.context_window == 512 and llm.metadata.num_output == 100
    assert llm.client.settings.context_length == 512
