"""Time to first token of turn N with KV-cache reuse against a cold evaluation of the same prompt.

A conversation is grown to about 500 and about 1,500 history tokens; then the next user turn is
sent (a) right after the previous turn, so the history is already in the cache, and (b) after
clearing the cache, so the whole prompt is evaluated. Same client, same prompt ids, greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit import LLMClient

TARGETS = (500, 1500)
FILLER = ("Here is a note about the history of lighthouses, their keepers and the ships they guided "
          "through storms along rocky coasts. ")


def conversation(client: LLMClient, target: int) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    i = 0
    while client.count_tokens(history) < target:
        history.append({"role": "user", "content": f"Note {i}: {FILLER * 2}"})
        history.append({"role": "assistant", "content": f"Thanks, I noted point {i}. {FILLER}"})
        i += 1
    return history


def ttft(client: LLMClient, messages: list[dict[str, Any]], cold: bool, prime: list[dict[str, Any]]) -> float:
    backend = client.engine.backend
    if cold:
        backend.truncate_cache(0)
    else:  # the previous turn: the history is in the cache as it would be in a chat
        client.chat.completions.create(messages=prime, max_tokens=1)
    start = time.perf_counter()
    for chunk in client.chat.completions.create(messages=messages, max_tokens=2, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["llama.cpp", "transformers"])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="kv_reuse")
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    table = ["TTFT of the next turn, KV reuse vs cold evaluation of the same prompt, median of 5", "",
             "| model | backend | history tokens | warm ms | cold ms | warm / cold |", "|---|---|---|---|---|---|"]
    for model in args.models:
        for backend in args.backends:
            client = LLMClient(model, backend=backend, temperature=0, context_length=4096,
                               n_threads=args.threads).load()
            for target in TARGETS:
                history = conversation(client, target)
                prime = history[:-1]  # the previous request: everything up to the last reply
                messages = [*history, {"role": "user", "content": "Summarise the notes in one line."}]
                tokens = client.count_tokens(messages)
                def run(cold: bool, c: LLMClient = client, m: list[dict[str, Any]] = messages,
                        p: list[dict[str, Any]] = prime) -> dict[str, float]:
                    return {"ttft_s": ttft(c, m, cold, p)}

                result = side_by_side({"warm": lambda: run(False), "cold": lambda: run(True)})
                warm, cold = result["warm"]["ttft_s"], result["cold"]["ttft_s"]
                rows[f"{model}/{backend}/{target}"] = {"prompt_tokens": tokens, "warm_s": warm, "cold_s": cold,
                                                       "ratio": warm / cold}
                table.append(f"| {model} | {backend} | {tokens} | {warm * 1e3:.1f} | {cold * 1e3:.1f} | "
                             f"{warm / cold:.3f}x |")
    write_results(args.out, {"threads": args.threads, "results": rows}, table)


if __name__ == "__main__":
    main()
