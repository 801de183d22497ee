"""The shipped LlamaIndex LLM contract, run on both backends with the embedded SmolLM2."""

from __future__ import annotations

import pytest
from llama_index.llms.local_llm_kit import LocalLLMKit
from llama_index.llms.local_llm_kit.contract import LLMContractTests

pytestmark = pytest.mark.integration


class TestLlamaCppContract(LLMContractTests):
    @pytest.fixture
    def llm(self, llama_cpp_llm: LocalLLMKit) -> LocalLLMKit:
        return llama_cpp_llm


@pytest.mark.slow
class TestTransformersContract(LLMContractTests):
    @pytest.fixture
    def llm(self, transformers_llm: LocalLLMKit) -> LocalLLMKit:
        return transformers_llm
