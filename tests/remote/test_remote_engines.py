"""backend="openai" against an engine nobody here wrote: llama-cpp-python's own server.

Also the LangChain and LlamaIndex adapters, unchanged, over a remote client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from local_llm_kit import CompletionResponse, InvalidRequestError, LLMClient, ModelNotFoundError, TokenLimitError
from tests.remote.conftest import KEY, MODEL
from tests.server.conftest import RunningServer

pytestmark = pytest.mark.integration

Q = [{"role": "user", "content": "List three fruits."}]


@pytest.fixture()
def llama_server_client(llama_cpp_server: str) -> Iterator[LLMClient]:
    with LLMClient(MODEL, backend="openai", base_url=llama_cpp_server, temperature=0) as client:
        yield client


def test_llama_cpp_server_chat_and_stream(llama_server_client: LLMClient) -> None:
    whole = llama_server_client.chat.completions.create(messages=Q, max_tokens=20)
    assert isinstance(whole, CompletionResponse) and whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 20
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       llama_server_client.chat.completions.create(messages=Q, max_tokens=20, stream=True)
                       if c.choices)
    assert streamed == whole.choices[0].message.content


def test_llama_cpp_server_counts_and_errors(llama_server_client: LLMClient, llama_cpp_server: str) -> None:
    # llama.cpp's server has no /tokenize for chat messages: the count comes from a one-token completion.
    usage = llama_server_client.chat.completions.create(messages=Q, max_tokens=2).usage
    assert llama_server_client.count_tokens(Q) == usage.prompt_tokens
    with pytest.raises(InvalidRequestError) as caught:  # our validation, before anything is sent
        llama_server_client.chat.completions.create(messages=Q, temperature=3)
    assert caught.value.param == "temperature"
    with pytest.raises((TokenLimitError, InvalidRequestError)):
        llama_server_client.chat.completions.create(messages=[{"role": "user", "content": "word " * 3000}])


def test_llama_cpp_server_json(llama_server_client: LLMClient) -> None:
    response = llama_server_client.chat.completions.create(
        messages=[{"role": "user", "content": "Give a JSON object with a key 'fruit'."}],
        response_format={"type": "json_object"}, max_tokens=40)
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content or ""), dict)


def test_memory_over_llama_cpp_server(llama_server_client: LLMClient) -> None:
    llama_server_client.enable_memory(max_tokens=300)
    first = llama_server_client.chat.completions.create(messages=[{"role": "user", "content": "My name is Ada."}],
                                                        max_tokens=12)
    second = llama_server_client.chat.completions.create(messages=[{"role": "user", "content": "Who am I?"}],
                                                         max_tokens=12)
    assert llama_server_client.memory[:2] == [{"role": "user", "content": "My name is Ada."},
                                              {"role": "assistant", "content": first.choices[0].message.content}]
    assert second.usage.prompt_tokens == llama_server_client.count_tokens(llama_server_client.memory[:3])


def test_unknown_model_name_on_our_server(our_server: RunningServer) -> None:
    with pytest.raises(ModelNotFoundError):
        LLMClient("no-such-model", backend="openai", base_url=our_server.base_url,
                  api_key=KEY).chat.completions.create(messages=Q)


def test_langchain_adapter_over_remote(smol: LLMClient) -> None:
    adapter = pytest.importorskip("langchain_local_llm_kit")
    chat = adapter.ChatLocalLLMKit(client=smol, max_tokens=16)
    reply = chat.invoke("List three fruits.")
    assert isinstance(reply.content, str) and reply.content
    assert "".join(str(c.content) for c in chat.stream("List three fruits.")) == reply.content
    assert chat.get_num_tokens_from_messages([reply]) > 0


def test_llama_index_adapter_over_remote(smol: LLMClient) -> None:
    adapter = pytest.importorskip("llama_index.llms.local_llm_kit")
    from llama_index.core.llms import ChatMessage

    llm = adapter.LocalLLMKit(client=smol, max_tokens=16)
    reply = llm.chat([ChatMessage(role="user", content="List three fruits.")])
    assert reply.message.content
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="List three fruits.")]))
    assert streamed == reply.message.content
