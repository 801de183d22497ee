"""ChatLocalLLMKit inside real LangChain code, on the real embedded model (SmolLM2 135M, llama.cpp, greedy)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.structured_output import ProviderStrategy, ToolStrategy
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_local_llm_kit import ChatLocalLLMKit, ConversationMemoryMiddleware, to_openai_messages
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

pytestmark = pytest.mark.integration

# Tool-call grammars: the client refuses a max_tokens below its estimate of the shortest complete
# reply (241 tokens for `add` with parallel calls allowed, though a real call takes about 31).
TOOL_MAX_TOKENS = 256


@pytest.fixture(scope="module")
def tool_model(real_model: ChatLocalLLMKit) -> ChatLocalLLMKit:
    """The same model and client, with room for tool calls (replies still stop when the call closes)."""
    return real_model.model_copy(update={"max_tokens": TOOL_MAX_TOKENS})


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(description="the city's name")
    country: str = Field(description="the country's name")


class CityDict(TypedDict):
    """A city and the country it is in."""

    city: str
    country: str


CITY_JSON_SCHEMA = City.model_json_schema()
PROMPT = "Paris is the capital of France. Extract the city and the country."

word_lengths: list[str] = []


@tool
def word_length(word: str) -> int:
    """Return the number of letters in a word."""
    word_lengths.append(word)
    return len(word)


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class ForceToolOnNewQuestion(AgentMiddleware):  # type: ignore[type-arg]
    """Force one tool call when the last message is the user's (a 135M model rarely chooses one),
    and a short text answer once the tool result is in: a deterministic agent loop."""

    def wrap_model_call(self, request: ModelRequest[Any],
                        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]) -> ModelResponse[Any]:
        if isinstance(request.messages[-1], HumanMessage):
            request = request.override(tool_choice="any", model_settings={"parallel_tool_calls": False})
        else:
            request = request.override(tool_choice="none", model_settings={"max_tokens": 32})
        return handler(request)


# -- plain calls -----------------------------------------------------------------------------------
def test_greedy_invoke_equals_client_create(real_model: ChatLocalLLMKit) -> None:
    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("Name a fruit that is yellow.")]
    # Each call from a cold KV cache: a reused prefix may shift logits enough to flip a near-tie.
    cold = real_model.sync_client.engine.backend.truncate_cache
    cold(0)
    reply = real_model.invoke(messages)
    cold(0)
    direct = real_model.sync_client.chat.completions.create(messages=to_openai_messages(messages), temperature=0,
                                                           max_tokens=48)
    assert reply.content == direct.choices[0].message.content
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == direct.usage.prompt_tokens
    assert reply.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    assert real_model.get_num_tokens_from_messages(messages) == direct.usage.prompt_tokens
    cold(0)
    streamed = "".join(chunk.text for chunk in real_model.stream(messages))
    assert streamed == reply.content


def test_lcel_chain(real_model: ChatLocalLLMKit) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "You answer in one short sentence."),
                                               ("human", "What is the colour of {thing}?")])
    chain = prompt | real_model | StrOutputParser()
    cold = real_model.sync_client.engine.backend.truncate_cache  # see test_greedy_invoke_equals_client_create
    cold(0)
    answer = chain.invoke({"thing": "the sky"})
    assert isinstance(answer, str) and answer.strip()
    cold(0)
    assert answer == real_model.invoke(prompt.invoke({"thing": "the sky"})).content
    answers = chain.batch([{"thing": "grass"}, {"thing": "snow"}])
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers)


# -- structured output -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize("schema", [City, CityDict, CITY_JSON_SCHEMA], ids=["pydantic", "typeddict", "json_schema"])
def test_with_structured_output_every_method(real_model: ChatLocalLLMKit, method: str, schema: Any) -> None:
    result = real_model.with_structured_output(schema, method=method).invoke(PROMPT)  # type: ignore[arg-type]
    if schema is City:
        assert isinstance(result, City)
        result = result.model_dump()
    assert isinstance(result, dict) and set(result) == {"city", "country"}
    assert all(isinstance(v, str) for v in result.values())


def test_structured_output_include_raw(real_model: ChatLocalLLMKit) -> None:
    out = real_model.with_structured_output(City, include_raw=True).invoke(PROMPT)
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], City) and out["parsing_error"] is None
    assert out["raw"].usage_metadata is not None


def test_agent_provider_strategy(real_model: ChatLocalLLMKit) -> None:
    agent = create_agent(real_model, tools=[], response_format=ProviderStrategy(City))
    state = agent.invoke({"messages": [HumanMessage(PROMPT)]})
    assert isinstance(state["structured_response"], City)
    assert not state["messages"][-1].tool_calls  # native structured output: no tool round trip


def test_agent_picks_native_structured_output_from_profile(real_model: ChatLocalLLMKit) -> None:
    # A bare schema: create_agent reads model.profile["structured_output"] and uses ProviderStrategy.
    agent = create_agent(real_model, tools=[], response_format=City)
    state = agent.invoke({"messages": [HumanMessage(PROMPT)]})
    assert isinstance(state["structured_response"], City)
    assert not state["messages"][-1].tool_calls


def test_agent_tool_strategy(tool_model: ChatLocalLLMKit) -> None:
    agent = create_agent(tool_model, tools=[], response_format=ToolStrategy(City))
    state = agent.invoke({"messages": [HumanMessage(PROMPT)]})
    assert isinstance(state["structured_response"], City)
    calls = [c for m in state["messages"] if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["name"] for c in calls] == ["City"]


# -- agents ----------------------------------------------------------------------------------------
def test_agent_with_tools_and_checkpointer_over_turns(tool_model: ChatLocalLLMKit) -> None:
    word_lengths.clear()
    agent = create_agent(tool_model, tools=[word_length, add], middleware=[ForceToolOnNewQuestion()],
                         checkpointer=InMemorySaver(),
                         system_prompt="You are a helpful assistant. Use the tools.")
    config: Any = {"configurable": {"thread_id": "t1"}}
    questions = ["How many letters are in the word 'banana'?", "And in the word 'kiwi'?",
                 "Add 2 and 3."]
    sizes = []
    for question in questions:
        state = agent.invoke({"messages": [HumanMessage(question)]}, config)
        sizes.append(len(state["messages"]))
        assert isinstance(state["messages"][-1], AIMessage) and not state["messages"][-1].tool_calls
    # the checkpointer kept every turn: each turn adds question, call, result(s) and answer
    assert sizes[0] >= 4 and sizes[1] >= sizes[0] + 4 and sizes[2] >= sizes[1] + 4
    messages = state["messages"]
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert len(calls) >= 3
    for call in calls:  # every call is valid for its tool and was really executed
        assert call["name"] in ("word_length", "add")
        result = results[call["id"]]
        assert result.status == "success"
        expected = len(call["args"]["word"]) if call["name"] == "word_length" else (
            call["args"]["a"] + call["args"]["b"])
        assert result.content == str(expected)
    assert word_lengths  # the Python function ran


# -- memory middleware ---------------------------------------------------------------------------------
def test_memory_middleware_keeps_20_turns_in_a_256_token_context() -> None:
    # No max_tokens for the middleware: the budget is what the 256-token context leaves after the reply.
    model = ChatLocalLLMKit(model="smollm2-135m-instruct", backend="llama.cpp", context_length=256, n_threads=1,
                            temperature=0, max_tokens=6)
    memory = ConversationMemoryMiddleware()
    agent = create_agent(model, tools=[], middleware=[memory], checkpointer=InMemorySaver(),
                         system_prompt="You are a friendly assistant. Answer briefly.")
    config: Any = {"configurable": {"thread_id": "long"}}
    dropped = []
    for turn in range(20):  # trimming starts at about the 8th turn
        state = agent.invoke({"messages": [HumanMessage(f"Note {turn}: I like {turn}.")]}, config)
        reply = state["messages"][-1]
        report = memory.last
        assert report is not None and reply.usage_metadata is not None
        # the count the middleware trimmed by is exactly what the model was fed
        assert reply.usage_metadata["input_tokens"] == report.prompt_tokens <= report.budget == 256 - 6
        dropped.append(report.dropped_turns)
    assert len(state["messages"]) == 40  # the checkpointer keeps the whole conversation
    assert dropped[0] == 0 and dropped[-1] > 0  # trimming started once the budget was reached
    assert sum(d > 0 for d in dropped) >= 8  # and went on for many turns
    # the last call's prompt, recounted by the client itself
    kept = state["messages"][-1 - report.kept_messages:-1]
    system = SystemMessage("You are a friendly assistant. Answer briefly.")
    assert model.sync_client.count_tokens(to_openai_messages([system, *kept])) == report.prompt_tokens


# -- async streaming and cancellation ----------------------------------------------------------------------
async def test_async_stream_tool_call_chunks_merge_to_the_call(tool_model: ChatLocalLLMKit) -> None:
    bound = tool_model.bind_tools([add], tool_choice="any")
    question = "What is 2 plus 3? Use the tool."
    whole = await bound.ainvoke(question)
    chunks = [chunk async for chunk in bound.astream(question)]
    assert any(isinstance(c, AIMessageChunk) and c.tool_call_chunks for c in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk) and merged.chunk_position == "last"
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    assert whole.tool_calls and whole.tool_calls[0]["name"] == "add"
    assert set(whole.tool_calls[0]["args"]) == {"a", "b"}
    assert merged.usage_metadata == whole.usage_metadata


async def test_cancelling_an_async_stream_stops_generation(real_model: ChatLocalLLMKit) -> None:
    messages = [HumanMessage("Write a very long story about a dragon.")]
    prompt_tokens = real_model.get_num_tokens_from_messages(messages)
    backend = real_model.sync_client.engine.backend
    backend.truncate_cache(0)  # so that every cached token past the prompt was generated by this stream

    async def consume() -> None:
        async for _ in real_model.astream(messages, max_tokens=400):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    while len(backend.cached_tokens) < prompt_tokens + 3:  # wait until a few tokens were generated
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    generated = len(backend.cached_tokens) - prompt_tokens
    await asyncio.sleep(0.2)
    assert len(backend.cached_tokens) - prompt_tokens == generated  # and nothing more is computed
    assert generated < 100  # far from the 400 tokens asked for
