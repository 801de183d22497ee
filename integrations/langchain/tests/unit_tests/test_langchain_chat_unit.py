"""ChatLocalLLMKit over local_llm_kit's weight-free FakeBackend: the adapter's own logic, fast."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.messages.utils import trim_messages
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_local_llm_kit import (
    ChatLocalLLMKit,
    add_to_memory,
    from_openai_messages,
    load_memory_file,
    messages_from_memory,
    save_memory_file,
    to_openai_messages,
)
from pydantic import BaseModel, ValidationError

from local_llm_kit import GenerationTimeoutError, InvalidRequestError, LLMClient, TokenLimitError
from local_llm_kit.testing import FakeBackend, fake_client


def fake_model(reply: Any = "Hello there!", **kwargs: Any) -> ChatLocalLLMKit:
    backend = kwargs.pop("backend", None) or FakeBackend(reply, n_ctx=kwargs.pop("n_ctx", 2048))
    return ChatLocalLLMKit(client=fake_client(backend=backend), **kwargs)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


class Person(BaseModel):
    """A person."""

    name: str
    age: int


# -- construction ----------------------------------------------------------------------------
def test_unknown_constructor_argument_raises() -> None:
    with pytest.raises(ValidationError, match="temprature"):
        ChatLocalLLMKit(temprature=0)


def test_client_and_load_settings_conflict() -> None:
    with pytest.raises(ValidationError, match="context_length cannot be combined with client="):
        ChatLocalLLMKit(client=fake_client(), context_length=512)


def test_client_with_memory_is_refused() -> None:
    client = fake_client()
    client.enable_memory(100)
    with pytest.raises(ValidationError, match="memory"):
        ChatLocalLLMKit(client=client)


def test_construction_is_lazy_and_resolves_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_LLM_KIT_CONTEXT_LENGTH", "777")
    model = ChatLocalLLMKit(model="no-such-model-anywhere")  # nothing is looked up until first use
    assert model.context_length == 777
    assert model.backend == "llama.cpp"
    assert model.profile is not None and model.profile["max_input_tokens"] == 777
    assert model.profile["structured_output"] and model.profile["tool_calling"] and model.profile["tool_choice"]


def test_ls_params_and_identifying_params() -> None:
    model = ChatLocalLLMKit(model="smollm2-135m-instruct", temperature=0, max_tokens=12, stop=["\n"])
    params = model._get_ls_params()
    assert params == {"ls_provider": "local_llm_kit", "ls_model_type": "chat",
                      "ls_model_name": "smollm2-135m-instruct", "ls_temperature": 0, "ls_max_tokens": 12,
                      "ls_stop": ["\n"]}
    assert model._get_ls_params(model="gemma-3-270m")["ls_model_name"] == "gemma-3-270m"
    assert model._identifying_params["max_tokens"] == 12


# -- invoke / stream ---------------------------------------------------------------------------
def test_invoke_metadata_and_usage_match_the_client() -> None:
    model = fake_model("Hello there!", temperature=0)
    messages = [SystemMessage("Be brief."), HumanMessage("Hi")]
    reply = model.invoke(messages)
    expected = model.sync_client.chat.completions.create(messages=to_openai_messages(messages), temperature=0)
    assert reply.content == expected.choices[0].message.content == "Hello there!"
    assert reply.usage_metadata == {"input_tokens": expected.usage.prompt_tokens,
                                    "output_tokens": expected.usage.completion_tokens,
                                    "total_tokens": expected.usage.total_tokens}
    assert reply.response_metadata["model_name"] == "fake-model"
    assert reply.response_metadata["finish_reason"] == "stop"
    assert model.get_num_tokens_from_messages(messages) == expected.usage.prompt_tokens


def test_stream_usage_once_and_last_chunk_marked() -> None:
    model = fake_model("Hello there, friend!", temperature=0)
    chunks = list(model.stream("Hi"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.chunk_position for c in chunks].count("last") == 1 and chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == "Hello there, friend!"
    assert full.response_metadata["finish_reason"] == "stop"
    assert full.response_metadata["model_name"] == "fake-model"
    assert full.usage_metadata is not None
    assert full.usage_metadata["input_tokens"] == model.get_num_tokens_from_messages([HumanMessage("Hi")])


async def test_async_invoke_and_stream_equal_sync() -> None:
    model = fake_model("Async works.", temperature=0)
    assert (await model.ainvoke("Hi")).content == "Async works."
    text = ""
    async for chunk in model.astream("Hi"):
        text += chunk.text
    assert text == "Async works."
    # the async client works over the sync client's loaded model
    assert model.aclient.engine is model.sync_client.engine


async def test_cancelling_an_async_stream_stops_generation() -> None:
    produced: list[str] = []

    def slow(prompt: str) -> str:
        produced.append("x")
        time.sleep(0.01)
        return "word " * 200

    model = fake_model(slow, temperature=0)
    stream = model.astream("Hi")
    first = await stream.__anext__()
    assert first.text
    await stream.aclose()
    # LangChain's outer generator leaves its inner one to the event loop's async-generator
    # finalizer, so the worker may take a few steps more: wait until it has stopped for good.
    settled = -1
    for _ in range(50):
        if len(produced) == settled:
            break
        settled = len(produced)
        await asyncio.sleep(0.1)
    assert len(produced) == settled  # the worker stopped
    assert settled < 1000  # far fewer steps than the whole reply needs


def test_timeout_stops_generation_and_retries() -> None:
    calls: list[int] = []

    def slow(prompt: str) -> str:
        calls.append(1)
        time.sleep(0.02)
        return "word " * 100

    tokens = _TokenRecorder()
    model = fake_model(slow, temperature=0, timeout=0.1, max_retries=1)
    with pytest.raises(GenerationTimeoutError, match=r"timeout of 0\.1 s"):
        model.invoke("Hi", config={"callbacks": [tokens]})
    # two attempts (one retry), each stopped well before the reply's 500 steps
    assert 2 <= len(calls) < 200
    assert tokens.tokens == []  # not streamed: the failed attempts' tokens reached no callback


class _TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_a_timeout_changes_nothing_but_the_time_limit() -> None:
    plain = fake_model("one two three", temperature=0)
    timed = fake_model("one two three", temperature=0, timeout=30)
    expected, reply = plain.invoke("Hi"), timed.invoke("Hi", config={"callbacks": [tokens := _TokenRecorder()]})
    assert reply.content == expected.content and reply.usage_metadata == expected.usage_metadata
    assert reply.id is not None and reply.id.startswith("chatcmpl-")
    assert tokens.tokens == []  # invoke stays off the streaming path
    both = fake_model("one two three", temperature=0, timeout=30, n=2).invoke("Hi")
    assert both.content == "one two three"


def test_generate_sums_token_usage_over_prompts() -> None:
    model = fake_model("one two three", temperature=0)
    result = model.generate([[HumanMessage("Hi")], [HumanMessage("Hello, how are you?")]])
    replies = [generation[0].message for generation in result.generations]
    assert result.llm_output is not None
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] == sum(r.usage_metadata["input_tokens"] for r in replies)  # type: ignore[index]
    assert usage["total_tokens"] == sum(r.usage_metadata["total_tokens"] for r in replies)  # type: ignore[index]
    assert result.llm_output["model_name"] == "fake-model"


def test_client_errors_surface_unchanged() -> None:
    model = fake_model("Hi", n_ctx=64)
    with pytest.raises(TokenLimitError):
        model.invoke("x" * 200)
    with pytest.raises(InvalidRequestError) as info:
        model.invoke("Hi", audio={"voice": "alloy"})
    assert info.value.param == "audio"


def test_stop_from_invoke_and_field() -> None:
    model = fake_model("one two three", temperature=0, stop=["three"])
    assert model.invoke("Hi").content == "one two "
    assert model.invoke("Hi", stop=["two"]).content == "one "


# -- tools -------------------------------------------------------------------------------------
def _bound(runnable: Any) -> dict[str, Any]:
    return dict(runnable.kwargs)


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", "auto"), ("none", "none"), ("required", "required"), ("any", "required"),
    ("add", {"type": "function", "function": {"name": "add"}}),
    ({"type": "function", "function": {"name": "shout"}}, {"type": "function", "function": {"name": "shout"}}),
])
def test_tool_choice_mapping(choice: Any, expected: Any) -> None:
    bound = _bound(fake_model().bind_tools([add, shout], tool_choice=choice))
    assert bound["tool_choice"] == expected
    assert [t["function"]["name"] for t in bound["tools"]] == ["add", "shout"]


def test_schema_violations_reach_response_metadata() -> None:
    """A keyword checked after decoding (uniqueItems) that the reply breaks is reported by the client
    on ``message.schema_violations``; the adapter used to drop it, returning invalid data silently."""
    schema = {"type": "object", "required": ["ids"], "additionalProperties": False,
              "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "Ids", "schema": schema}}
    model = fake_model('{"ids": [1, 1]}').bind(response_format=fmt)
    [violation] = model.invoke("ids?").response_metadata["schema_violations"]
    assert "uniqueItems" in violation
    merged = None
    for chunk in model.stream("ids?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None and merged.response_metadata["schema_violations"] == [violation]
    assert "schema_violations" not in fake_model('{"ids": [1, 2]}').bind(response_format=fmt).invoke(
        "ids?").response_metadata


def test_tool_choice_true_requires_a_tool_call_as_chat_openai() -> None:
    """ChatOpenAI maps ``True`` to ``"required"``; it used to raise here with two tools bound."""
    assert _bound(fake_model().bind_tools([add, shout], tool_choice=True))["tool_choice"] == "required"
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    calls = fake_model(call).bind_tools([add, shout], tool_choice=True).invoke("2 + 3?").tool_calls
    assert [(c["name"], c["args"]) for c in calls] == [("add", {"a": 2, "b": 3})]


@pytest.mark.parametrize("choice", ["multiply", {"type": "function", "function": {"name": "multiply"}}])
def test_unknown_tool_choice_names_the_argument(choice: Any) -> None:
    with pytest.raises(ValueError, match="tool_choice"):
        fake_model().bind_tools([add], tool_choice=choice)


def test_bind_tools_accepts_every_kind() -> None:
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    openai_dict = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    bound = _bound(fake_model().bind_tools([add, Person, multiply, openai_dict, Person.model_json_schema()]))
    assert [t["function"]["name"] for t in bound["tools"]] == ["add", "Person", "multiply", "noop", "Person"]


def test_response_format_passes_through_bind_tools() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}}
    bound = _bound(fake_model().bind_tools([], response_format=response_format))
    assert bound == {"response_format": response_format}
    bound = _bound(fake_model().bind_tools([add], response_format=Person, strict=True))
    assert bound["response_format"]["json_schema"]["name"] == "Person"
    assert bound["response_format"]["json_schema"]["strict"] is True


def test_a_pydantic_class_as_response_format_is_honoured_and_parsed() -> None:
    model = fake_model('{"name": "Ann", "age": 3}', temperature=0)
    for reply in (model.invoke("Hi", response_format=Person), model.bind(response_format=Person).invoke("Hi")):
        assert reply.additional_kwargs["parsed"] == Person(name="Ann", age=3)


def test_tool_choice_none_without_tools_binds_nothing() -> None:
    model = fake_model("Hello there!")
    assert _bound(model.bind_tools([], tool_choice="none")) == {}
    assert model.bind_tools([], tool_choice="none").invoke("Hi").content == "Hello there!"


def test_tool_message_history_round_trips() -> None:
    history = [
        HumanMessage("Add 1 and 2."),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"},
                                  {"name": "add", "args": {"a": 1}, "id": "call_2", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="call_1", name="add"),
        ToolMessage([{"type": "text", "text": "boom"}], tool_call_id="call_2", status="error"),
    ]
    openai = to_openai_messages(history)
    assert openai[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        {"type": "function", "id": "call_2", "function": {"name": "add", "arguments": '{"a": 1}'}}]}
    assert openai[3]["content"] == "boom" and openai[3]["tool_call_id"] == "call_2"
    back = from_openai_messages(openai)
    assert isinstance(back[1], AIMessage) and back[1].tool_calls == history[1].tool_calls
    assert isinstance(back[2], ToolMessage) and back[2].tool_call_id == "call_1" and back[2].content == "3"
    # and the client takes it as it is
    fake_model("ok").invoke(history)


def test_image_content_is_rejected_with_the_part_named() -> None:
    message = HumanMessage([{"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(InvalidRequestError) as info:
        fake_model().invoke([message])
    assert info.value.param == "messages[0].content[1].type"


# -- structured output ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output_reports_ls_format(method: str) -> None:
    runnable = fake_model().with_structured_output(Person, method=method)  # type: ignore[arg-type]
    bound = runnable.first.kwargs  # type: ignore[attr-defined]
    assert bound["ls_structured_output_format"]["kwargs"]["method"] == method
    if method == "json_schema":
        assert bound["response_format"]["type"] == "json_schema"
        assert bound["response_format"]["json_schema"]["schema"]["required"] == ["name", "age"]
    elif method == "function_calling":
        assert bound["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
        assert bound["parallel_tool_calls"] is False
    else:
        assert bound["response_format"]["type"] == "json_object"
        assert bound["response_format"]["schema"]["required"] == ["name", "age"]


def test_structured_output_parses_constrained_reply() -> None:
    model = fake_model('{"name": "Ada", "age": 36}', temperature=0)
    assert model.with_structured_output(Person).invoke("Ada, 36") == Person(name="Ada", age=36)
    raw = model.with_structured_output(Person, include_raw=True).invoke("Ada, 36")
    assert raw["parsed"] == Person(name="Ada", age=36) and raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)


def test_structured_output_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        fake_model().with_structured_output(Person, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema is required"):
        fake_model().with_structured_output(None)
    with pytest.raises(ValueError, match="unsupported arguments"):
        fake_model().with_structured_output(Person, tools=[add])


# -- token counting --------------------------------------------------------------------------------
def test_token_counts_are_the_clients() -> None:
    model = fake_model()
    messages = [SystemMessage("You are terse."), HumanMessage("Add 2 and 3")]
    client: LLMClient = model.sync_client
    assert model.get_num_tokens_from_messages(messages) == client.count_tokens(to_openai_messages(messages))
    with_tools = model.get_num_tokens_from_messages(messages, tools=[add])
    assert with_tools == client.count_tokens(to_openai_messages(messages), tools=[convert_to_openai_tool(add)])
    assert with_tools > model.get_num_tokens_from_messages(messages)  # the tool schemas are in the prompt
    assert model.get_num_tokens("hello") == len(b"hello")  # one token per byte on the fake model
    trimmed = trim_messages(messages * 5, max_tokens=60, token_counter=model, strategy="last")
    assert model.get_num_tokens_from_messages(trimmed) <= 60


# -- memory conversions ------------------------------------------------------------------------------
def test_memory_both_ways(tmp_path: Path) -> None:
    client = fake_client("Nice to meet you, Ada.")
    client.enable_memory(500)
    client.chat.completions.create(messages=[{"role": "user", "content": "My name is Ada."}])
    messages = messages_from_memory(client)
    assert [type(m) for m in messages] == [HumanMessage, AIMessage]
    assert messages[1].content == "Nice to meet you, Ada."

    path = tmp_path / "chat.json"
    client.save_memory(path)
    assert load_memory_file(path) == messages

    history = [SystemMessage("Be kind."), HumanMessage("Hi"),
               AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}]),
               ToolMessage("3", tool_call_id="c1")]
    save_memory_file(history, tmp_path / "lc.json", max_tokens=400)
    other = fake_client()
    other.load_memory(tmp_path / "lc.json")
    assert other.memory == to_openai_messages(history)
    assert from_openai_messages(other.memory)[2].tool_calls == history[2].tool_calls  # type: ignore[attr-defined]

    add_to_memory(client, [HumanMessage("And my age?")])
    assert client.memory[-1] == {"role": "user", "content": "And my age?"}


def test_past_reasoning_blocks_are_left_out_of_the_history() -> None:
    history = [HumanMessage("Hello"),
               AIMessage([{"type": "thinking", "thinking": "a greeting", "signature": "x"},
                          {"type": "text", "text": "Hello, how are you?"}]),
               HumanMessage("Well, thanks.")]
    assert to_openai_messages(history)[1] == {"role": "assistant", "content": "Hello, how are you?"}


# -- memory middleware ---------------------------------------------------------------------------
def test_memory_middleware_trims_whole_turns_with_exact_counts() -> None:
    from langchain.agents import create_agent
    from langchain_local_llm_kit import ConversationMemoryMiddleware
    from langchain_local_llm_kit.middleware import split_turns
    from langgraph.checkpoint.memory import InMemorySaver

    model = fake_model("Noted.", temperature=0, max_tokens=10, n_ctx=400)
    memory = ConversationMemoryMiddleware(max_tokens=250)
    agent = create_agent(model, tools=[], middleware=[memory], checkpointer=InMemorySaver(), system_prompt="Be brief.")
    config: Any = {"configurable": {"thread_id": "t"}}
    for turn in range(12):
        state = agent.invoke({"messages": [HumanMessage(f"Remember fact number {turn}.")]}, config)
        report = memory.last
        assert report is not None and report.budget == 250
        assert state["messages"][-1].usage_metadata["input_tokens"] == report.prompt_tokens <= 250
        kept = state["messages"][-1 - report.kept_messages:-1]
        _, turns = split_turns(kept)
        assert isinstance(kept[0], HumanMessage) and all(isinstance(t[0], HumanMessage) for t in turns)
        assert model.get_num_tokens_from_messages([SystemMessage("Be brief."), *kept]) == report.prompt_tokens
    assert len(state["messages"]) == 24 and report.dropped_turns > 0
    # the fewest turns were dropped: keeping one more (user + reply) would not have fit
    end = len(state["messages"]) - 1
    one_more = state["messages"][end - report.kept_messages - 2:end]
    assert model.get_num_tokens_from_messages([SystemMessage("Be brief."), *one_more]) > 250


def test_memory_middleware_never_exceeds_the_context() -> None:
    from langchain_core.messages import AIMessage as AI
    from langchain_local_llm_kit import ConversationMemoryMiddleware

    model = fake_model("ok", temperature=0, max_tokens=20, n_ctx=200)
    memory = ConversationMemoryMiddleware(max_tokens=10_000)  # larger than the context: the context rules
    history: list[Any] = []
    for turn in range(10):
        history += [HumanMessage(f"message {turn} " * 3), AI("ok")]

    class _Request:
        def __init__(self, messages: list[Any]) -> None:
            self.model, self.messages, self.system_message, self.tools, self.model_settings = (
                model, messages, None, [], {})

        def override(self, **kw: Any) -> Any:
            return _Request(kw["messages"])

    seen: list[int] = []

    def handler(request: Any) -> Any:
        seen.append(model.get_num_tokens_from_messages(request.messages))
        return model.invoke(request.messages)

    memory.wrap_model_call(_Request([*history, HumanMessage("last")]), handler)  # type: ignore[arg-type]
    assert memory.last is not None and memory.last.budget == 200 - 20
    assert seen[0] == memory.last.prompt_tokens <= 180


def test_the_async_client_of_a_remote_model_talks_to_the_same_server() -> None:
    remote = LLMClient("served-model", backend="openai", base_url="http://127.0.0.1:9/v1", api_key="secret")
    model = ChatLocalLLMKit(client=remote)
    derived = model.aclient
    assert derived.settings.backend == "openai"
    assert (derived.settings.base_url, derived.settings.api_key) == ("http://127.0.0.1:9/v1", "secret")
    assert derived.model == "served-model"
