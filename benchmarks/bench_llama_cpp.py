"""Decode speed and time to first token of ``create()`` on the llama.cpp backend.

Peers, side by side on the same GGUF with the same threads, greedy:
- llama-cpp-python's own ``create_chat_completion`` (its chat path: sampler chain in C);
- a bare loop: ``Llama.eval`` + argmax over the last logits (the floor of any Python loop).

Decode tokens/s counts the tokens after the first over the time after the first; TTFT is the
time to the first content from a cold cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit import LLMClient
from local_llm_kit.backends.llama_cpp import default_threads

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
MAX_TOKENS = 128


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=default_threads())
    threads = parser.parse_args().threads
    client = LLMClient("smollm2-135m-instruct", temperature=0, n_threads=threads).load()
    path = str(client.resolved_model.path)
    backend = client.engine.backend
    prompt = client.engine.encode(MESSAGES)
    peer = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                           verbose=False, swa_full=True)

    def ours() -> dict[str, float]:
        backend.truncate_cache(0)  # cold prompt every run
        start = time.perf_counter()
        first = None
        tokens = 0
        for chunk in client.chat.completions.create(messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            elif first is None and chunk.choices[0].delta.content:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return {"ttft_s": first - start, "decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens}

    def theirs() -> dict[str, float]:
        peer.reset()
        start = time.perf_counter()
        first = None
        tokens = 0
        for chunk in peer.create_chat_completion(messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0,
                                                 stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                tokens += 1  # one content chunk per token in llama-cpp-python's stream
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return {"ttft_s": first - start, "decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens}

    def bare() -> dict[str, float]:
        peer.reset()
        start = time.perf_counter()
        peer.eval(prompt)
        ctx = peer._ctx.ctx
        n_vocab = peer.n_vocab()
        token = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))
        first = time.perf_counter()
        for _ in range(MAX_TOKENS - 1):
            peer.eval([token])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_tok_s": (MAX_TOKENS - 1) / (end - first), "tokens": MAX_TOKENS}

    results = side_by_side({"local_llm_kit create()": ours,
                            "llama-cpp-python create_chat_completion": theirs,
                            "bare Llama.eval loop": bare})
    base = results["local_llm_kit create()"]
    table = [f"SmolLM2-135M-Instruct Q4_1, llama.cpp backend, {threads} threads, greedy, {MAX_TOKENS} new tokens, "
             "median of 5",
             "", "| path | decode tok/s | ours / peer | TTFT ms | tokens |", "|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = base["decode_tok_s"] / r["decode_tok_s"]
        table.append(f"| {name} | {r['decode_tok_s']:.1f} | {ratio:.3f}x | {r['ttft_s'] * 1e3:.1f} "
                     f"| {r['tokens']:.0f} |")
    write_results("llama_cpp", {"threads": threads, "max_tokens": MAX_TOKENS, "results": results}, table)


if __name__ == "__main__":
    main()
