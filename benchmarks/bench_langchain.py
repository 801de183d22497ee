"""Overhead of the LangChain adapter: ``ChatLocalLLMKit.stream``/``invoke`` against the direct client.

Same model object underneath (the adapter's own ``LLMClient``), same prompt, greedy, 128 new
tokens, cold KV cache every run, contenders interleaved run by run (median of 5 after a warm-up):

- stream: time to first token (TTFT) and decode tokens/s (tokens after the first over the time
  after the first), ``client.chat.completions.create(stream=True)`` vs ``model.stream(...)``;
- invoke: completion tokens per second of the whole call, ``create()`` vs ``model.invoke(...)``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RUNS, side_by_side, write_results
from langchain_core.messages import HumanMessage
from langchain_local_llm_kit import ChatLocalLLMKit

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 128


_PROBE = ("import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False); "
          "m.eval(m.tokenize(b'hello there, friend'))")


def avoid_llama_cpp_crash(model_path: str) -> bool:
    """Turn off llama.cpp's extra weight buffers when a batched decode crashes with them.

    On the development VM (CPU reports AMX) llama-cpp-python 0.3.36 dies with SIGSEGV on any batch
    of two or more tokens while Q4 weights sit in its AMX buffer type. A throw-away process probes;
    only if it crashes is ``use_extra_bufts`` turned off, for both contenders alike.
    """
    import llama_cpp

    if subprocess.run([sys.executable, "-c", _PROBE, model_path], capture_output=True, check=False).returncode >= 0:
        return False
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    threads = parser.parse_args().threads
    model = ChatLocalLLMKit(model="smollm2-135m-instruct", temperature=0, max_tokens=MAX_TOKENS, n_threads=threads)
    no_extra_buffers = avoid_llama_cpp_crash(str(model.sync_client.resolved_model.path))
    client = model.sync_client.load()
    backend = client.engine.backend
    lc_messages = [HumanMessage(PROMPT)]

    def client_stream() -> dict[str, float]:
        backend.truncate_cache(0)
        start = time.perf_counter()
        first = None
        tokens = 0
        for chunk in client.chat.completions.create(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            elif first is None and chunk.choices[0].delta.content:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return {"ttft_s": first - start, "decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens}

    def langchain_stream() -> dict[str, float]:
        backend.truncate_cache(0)
        start = time.perf_counter()
        first = None
        tokens = 0
        for chunk in model.stream(lc_messages):
            if chunk.usage_metadata:
                tokens = chunk.usage_metadata["output_tokens"]
            elif first is None and chunk.text:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return {"ttft_s": first - start, "decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens}

    def client_create() -> dict[str, float]:
        backend.truncate_cache(0)
        start = time.perf_counter()
        reply = client.chat.completions.create(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        elapsed = time.perf_counter() - start
        tokens = reply.usage.completion_tokens
        return {"call_s": elapsed, "tok_s": tokens / elapsed, "tokens": tokens}

    def langchain_invoke() -> dict[str, float]:
        backend.truncate_cache(0)
        start = time.perf_counter()
        reply = model.invoke(lc_messages)
        elapsed = time.perf_counter() - start
        assert reply.usage_metadata is not None
        tokens = reply.usage_metadata["output_tokens"]
        return {"call_s": elapsed, "tok_s": tokens / elapsed, "tokens": tokens}

    streams = side_by_side({"client create(stream=True)": client_stream, "ChatLocalLLMKit.stream": langchain_stream})
    calls = side_by_side({"client create()": client_create, "ChatLocalLLMKit.invoke": langchain_invoke})
    s_ours, s_peer = streams["ChatLocalLLMKit.stream"], streams["client create(stream=True)"]
    c_ours, c_peer = calls["ChatLocalLLMKit.invoke"], calls["client create()"]
    ratios = {"stream_decode": s_ours["decode_tok_s"] / s_peer["decode_tok_s"],
              "stream_ttft": s_ours["ttft_s"] / s_peer["ttft_s"],
              "invoke_tok_s": c_ours["tok_s"] / c_peer["tok_s"]}
    table = [f"SmolLM2-135M-Instruct Q4_1, llama.cpp backend, {threads} thread(s), greedy, {MAX_TOKENS} new tokens, "
             f"cold cache, median of {RUNS}, interleaved"
             + (" (llama.cpp extra buffer types off: they crash on this CPU)" if no_extra_buffers else ""),
             "", "| path | decode tok/s | TTFT ms | LangChain / client |", "|---|---|---|---|"]
    for name, r in streams.items():
        ratio = "—" if r is s_peer else f"{ratios['stream_decode']:.3f}x decode, {ratios['stream_ttft']:.3f}x TTFT"
        table.append(f"| {name} | {r['decode_tok_s']:.1f} | {r['ttft_s'] * 1e3:.1f} | {ratio} |")
    table += ["", "| path | tok/s (whole call) | call ms | LangChain / client |", "|---|---|---|---|"]
    for name, r in calls.items():
        ratio = "—" if r is c_peer else f"{ratios['invoke_tok_s']:.3f}x"
        table.append(f"| {name} | {r['tok_s']:.1f} | {r['call_s'] * 1e3:.1f} | {ratio} |")
    write_results("langchain", {"threads": threads, "max_tokens": MAX_TOKENS,
                                "llama_cpp_extra_buffers_off": no_extra_buffers, "stream": streams, "invoke": calls,
                                "ratios": ratios}, table)


if __name__ == "__main__":
    main()
