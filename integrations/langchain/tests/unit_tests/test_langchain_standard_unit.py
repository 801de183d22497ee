"""LangChain's standard unit suite for ChatLocalLLMKit (no weights are loaded: only construction,
binding and serialization are exercised)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_local_llm_kit import ChatLocalLLMKit
from langchain_tests.unit_tests import ChatModelUnitTests
from syrupy.assertion import SnapshotAssertion


class TestChatLocalLLMKitStandardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatLocalLLMKit

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "smollm2-135m-instruct", "temperature": 0}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # The client's settings come from LOCAL_LLM_KIT_* variables when not passed.
        return ({"LOCAL_LLM_KIT_CONTEXT_LENGTH": "1024", "LOCAL_LLM_KIT_BACKEND": "transformers"},
                {"model": "smollm2-135m-instruct"},
                {"context_length": 1024, "backend": "transformers"})

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @pytest.mark.xfail(raises=ValueError, strict=True, reason=(
        "dumpd() works and matches the committed snapshot, but langchain_core.load.load() revives only the "
        "classes on langchain-core's own allowlist (langchain_core.load.mapping), even with "
        "allowed_objects='all'; a package outside langchain-ai's repository cannot be on it. Observed: "
        "ValueError: Deserialization of ('langchain_local_llm_kit', 'chat_models', 'ChatLocalLLMKit') is not "
        "allowed."))
    def test_serdes(self, model: BaseChatModel, snapshot: SnapshotAssertion) -> None:
        super().test_serdes(model, snapshot)
