"""What the LlamaIndex adapter costs: ``LocalLLMKit.chat``/``stream_chat`` against the direct client.

Both contenders drive the same loaded engine (llama.cpp backend, SmolLM2), greedy, same prompt,
cold KV cache each run, interleaved run by run (benchmarks/common.py). Streamed: time to first
content and decode tokens/s (tokens after the first over the time after the first). Not
streamed: completion tokens over the whole call. Target: the adapter at >= 0.98x the client.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.local_llm_kit import LocalLLMKit

from local_llm_kit import LLMClient
from local_llm_kit.backends.llama_cpp import default_threads

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
LI_MESSAGES = [ChatMessage(role="user", content=MESSAGES[0]["content"])]
MAX_TOKENS = 128


def _stream_figures(start: float, cpu_start: float, first: float | None, cpu_first: float | None,
                    tokens: int) -> dict[str, float]:
    """Wall-clock figures, and CPU-time ones (one llama.cpp thread computes in this thread, so
    process time is the work done, which a busy shared machine distorts far less than wall time)."""
    end, cpu_end = time.perf_counter(), time.process_time()
    assert first is not None and cpu_first is not None
    return {"ttft_s": first - start, "decode_tok_s": (tokens - 1) / (end - first),
            "ttft_cpu_s": cpu_first - cpu_start, "decode_tok_cpu_s": (tokens - 1) / (cpu_end - cpu_first),
            "tokens": tokens}


def _call_figures(start: float, cpu_start: float, tokens: int) -> dict[str, float]:
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"total_s": elapsed, "tok_s": tokens / elapsed, "cpu_s": cpu, "tok_cpu_s": tokens / cpu, "tokens": tokens}


def _without_weight_repacking() -> None:
    """TEMPORARY workaround (same as integrations/llama_index/tests/conftest.py): llama-cpp-python
    0.3.36 as built here segfaults in its first eval on this Intel Xeon (AVX512/AMX) when weights
    are repacked into the CPU's extra buffer types. The fix belongs in local_llm_kit/backends/llama_cpp.py."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_cpp.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        value = original()
        value.use_extra_bufts = False
        return value

    llama_module.llama_cpp.llama_model_default_params = params


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=default_threads())
    threads = parser.parse_args().threads
    _without_weight_repacking()
    client = LLMClient("smollm2-135m-instruct", temperature=0, n_threads=threads).load()
    llm = LocalLLMKit(client=client, temperature=0, max_tokens=MAX_TOKENS)
    backend = client.engine.backend

    def client_stream() -> dict[str, float]:
        backend.truncate_cache(0)  # cold prompt every run
        start, cpu_start = time.perf_counter(), time.process_time()
        first = cpu_first = None
        tokens = 0
        for chunk in client.chat.completions.create(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            elif first is None and chunk.choices[0].delta.content:
                first, cpu_first = time.perf_counter(), time.process_time()
        return _stream_figures(start, cpu_start, first, cpu_first, tokens)

    def adapter_stream() -> dict[str, float]:
        backend.truncate_cache(0)
        start, cpu_start = time.perf_counter(), time.process_time()
        first = cpu_first = None
        tokens = 0
        for response in llm.stream_chat(LI_MESSAGES):
            if response.additional_kwargs.get("completion_tokens"):
                tokens = response.additional_kwargs["completion_tokens"]
            elif first is None and response.delta:
                first, cpu_first = time.perf_counter(), time.process_time()
        return _stream_figures(start, cpu_start, first, cpu_first, tokens)

    def client_chat() -> dict[str, float]:
        backend.truncate_cache(0)
        start, cpu_start = time.perf_counter(), time.process_time()
        response = client.chat.completions.create(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        return _call_figures(start, cpu_start, response.usage.completion_tokens)

    def adapter_chat() -> dict[str, float]:
        backend.truncate_cache(0)
        start, cpu_start = time.perf_counter(), time.process_time()
        response = llm.chat(LI_MESSAGES)
        return _call_figures(start, cpu_start, response.additional_kwargs["completion_tokens"])

    streamed = side_by_side({"client create(stream=True)": client_stream,
                             "LocalLLMKit.stream_chat": adapter_stream})
    whole = side_by_side({"client create()": client_chat, "LocalLLMKit.chat": adapter_chat})
    s_base, s_ours = streamed["client create(stream=True)"], streamed["LocalLLMKit.stream_chat"]
    w_base, w_ours = whole["client create()"], whole["LocalLLMKit.chat"]
    def ratio(ours: dict[str, float], base: dict[str, float], key: str) -> str:
        return f"{ours[key] / base[key]:.3f}x"

    table = [f"SmolLM2-135M-Instruct Q4_1, llama.cpp backend, {threads} threads, greedy, {MAX_TOKENS} new tokens, "
             "cold prompt, median of 5, contenders interleaved; wall clock and CPU time of this process",
             "", "| path | decode tok/s | adapter / client | decode tok/CPU-s | adapter / client | TTFT ms "
             "| adapter / client |", "|---|---|---|---|---|---|---|",
             f"| client `create(stream=True)` | {s_base['decode_tok_s']:.1f} | — | {s_base['decode_tok_cpu_s']:.1f} "
             f"| — | {s_base['ttft_s'] * 1e3:.1f} | — |",
             f"| `LocalLLMKit.stream_chat` | {s_ours['decode_tok_s']:.1f} | "
             f"**{ratio(s_ours, s_base, 'decode_tok_s')}** | {s_ours['decode_tok_cpu_s']:.1f} | "
             f"**{ratio(s_ours, s_base, 'decode_tok_cpu_s')}** | {s_ours['ttft_s'] * 1e3:.1f} | "
             f"{ratio(s_ours, s_base, 'ttft_s')} |",
             "", "| path | tok/s (whole call) | adapter / client | tok/CPU-s | adapter / client |",
             "|---|---|---|---|---|",
             f"| client `create()` | {w_base['tok_s']:.1f} | — | {w_base['tok_cpu_s']:.1f} | — |",
             f"| `LocalLLMKit.chat` | {w_ours['tok_s']:.1f} | **{ratio(w_ours, w_base, 'tok_s')}** | "
             f"{w_ours['tok_cpu_s']:.1f} | **{ratio(w_ours, w_base, 'tok_cpu_s')}** |",
             "", f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"]
    write_results("llama_index", {"threads": threads, "max_tokens": MAX_TOKENS, "streamed": streamed,
                                  "whole": whole}, table)


if __name__ == "__main__":
    main()
