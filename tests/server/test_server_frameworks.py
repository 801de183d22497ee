"""Clients written for OpenAI's service, pointed at our server: only base_url and api_key change."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from tests.server.conftest import RunningServer

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


class Person(BaseModel):
    name: str
    age: int


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


def test_langchain_chat_openai(smol_server: RunningServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=smol_server.base_url, api_key="test-key",
                                      temperature=0, max_tokens=24, max_retries=0)
    reply = llm.invoke("List three fruits.")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in llm.stream("List three fruits."))
    assert streamed == reply.content

    roomy = langchain_openai.ChatOpenAI(model=MODEL, base_url=smol_server.base_url, api_key="test-key",
                                        temperature=0, max_tokens=200, max_retries=0)
    called = roomy.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert isinstance(called.tool_calls[0]["args"]["city"], str)

    person = roomy.with_structured_output(Person).invoke("Invent a person with a name and an age.")
    assert isinstance(person, Person)
    raw = roomy.with_structured_output(Person, method="json_mode").invoke(
        "Invent a person. Answer in JSON with keys name and age.")
    assert isinstance(raw, (Person, dict))


def test_llama_index_openai_like(smol_server: RunningServer) -> None:
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(model=MODEL, api_base=smol_server.base_url, api_key="test-key",
                                 is_chat_model=True, is_function_calling_model=True, context_window=2048,
                                 temperature=0, max_tokens=24, max_retries=0)
    roomy = openai_like.OpenAILike(model=MODEL, api_base=smol_server.base_url, api_key="test-key",
                                   is_chat_model=True, is_function_calling_model=True, context_window=2048,
                                   temperature=0, max_tokens=200, max_retries=0)
    reply = llm.chat([ChatMessage(role="user", content="List three fruits.")])
    assert reply.message.content
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="List three fruits.")]))
    assert streamed == reply.message.content
    assert llm.complete("List three fruits.").text

    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(fn=get_weather)
    response = roomy.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
    calls = roomy.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert calls[0].tool_name == "get_weather" and isinstance(calls[0].tool_kwargs["city"], str)

    person = roomy.as_structured_llm(Person).complete("Invent a person with a name and an age.")
    assert isinstance(json.loads(person.text), dict)
