"""llama.cpp load options on the real packaged model: GPU options checked against the build, slots."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from local_llm_kit import InvalidRequestError, LLMClient

pytestmark = pytest.mark.integration

Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_gpu_offload_is_checked_against_the_build(cache_dir: Path) -> None:
    client = LLMClient(backend="llama.cpp", temperature=0, cache_dir=cache_dir, n_gpu_layers=-1)
    try:
        if llama_cpp.llama_supports_gpu_offload():
            assert client.load().engine.backend.info.extra["n_gpu_layers"] == "-1"
            assert client.chat.completions.create(messages=Q, max_tokens=4).choices[0].message.content
        else:  # a CPU-only build: reported, not silently run on the CPU
            with pytest.raises(InvalidRequestError, match="built for the CPU only") as info:
                client.load()
            assert info.value.param == "n_gpu_layers"
    finally:
        client.close()


def test_tensor_split_beyond_the_devices_of_the_build_is_rejected(cache_dir: Path) -> None:
    too_many = [1.0] * (int(llama_cpp.llama_max_devices()) + 1)
    client = LLMClient(backend="llama.cpp", cache_dir=cache_dir, tensor_split=too_many)
    with pytest.raises(InvalidRequestError) as info:
        client.load()
    assert info.value.param == "tensor_split"
    client.close()


def test_flash_attention_and_slot_count_are_applied_and_reported(cache_dir: Path) -> None:
    with LLMClient(backend="llama.cpp", temperature=0, cache_dir=cache_dir, flash_attn=True, kv_slots=2,
                   context_length=512) as client:
        backend = client.load().engine.backend
        assert backend.info.extra["flash_attn"] == "true" and backend.n_slots == 2
        assert backend.n_ctx == 512  # every slot holds a whole context
        reply = client.chat.completions.create(messages=Q, max_tokens=12)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 12
