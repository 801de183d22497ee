"""LangChain's standard integration suite for ChatLocalLLMKit, on the real embedded model.

SmolLM2 135M Instruct on llama.cpp, greedy. Every protocol and format test runs as it is.
Tests that fail only because a 135M model answers wrongly are marked xfail below, each with the
reason and the output observed; the adapter's part of them (valid tool calls, parsing, metadata)
is asserted in test_langchain_real_model.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_local_llm_kit import ChatLocalLLMKit
from langchain_tests.integration_tests import ChatModelIntegrationTests

# The same load settings as the real_model fixture of conftest.py: one loaded model for all tests.
REAL_MODEL: dict[str, Any] = {"model": "smollm2-135m-instruct", "backend": "llama.cpp", "context_length": 2048,
                              "n_threads": 1}


class TestChatLocalLLMKitStandardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLocalLLMKit

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # 128 tokens: SmolLM2 runs on inside the jokes of the structured-output tests until the
        # budget, where the reply is closed valid either way; 256 cost two minutes of suite time.
        return {**REAL_MODEL, "temperature": 0, "max_tokens": 128}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        # A per-call model= loads the other packaged model (Gemma 3 270M) through the same client.
        return "gemma-3-270m"

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(strict=True, reason=(
        "model's choice: with tool_choice left to the model (auto), SmolLM2 135M answers in text instead of "
        "calling get_weather. Observed (greedy): content 'The weather in San Francisco, CA, is mostly sunny and "
        "warm.', tool_calls [], finish_reason 'stop'. The same loop with a forced call passes in "
        "test_langchain_real_model.py::test_agent_with_tools_and_checkpointer_over_turns."))
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
