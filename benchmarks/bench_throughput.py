"""Throughput past one conversation: the multi-slot prefix cache and the request path's own cost.

1. **Interleaved conversations.** Four conversations of about 1,000 history tokens each take
   turns round-robin on one model. Time to first token of each turn with ``kv_slots=4`` against
   ``kv_slots=1`` (where every turn evicts the previous conversation and is a cold prefill).
   Both clients load the same file with the same threads; their turns alternate round by round.
   Also decode tokens/s of one reply on each, to show a slot costs memory, not speed.
2. **Request path.** A warm turn with memory on at about 500, 1,500 and 3,000 history tokens:
   wall time of ``create(max_tokens=1)`` minus the time spent inside the backend's forward
   passes, i.e. validation, memory, rendering, tokenizing, slot choice, sampling and shaping.
   Each measured turn starts from the same history, whose size is the one reported.
   Incremental encoding (:mod:`local_llm_kit.encoding`: encoded prefixes and turn-by-turn
   tokenization) against whole tokenization of every prompt, side by side on the same client;
   the three sizes and two modes take turns round after round. ``BENCH_RUNS=15`` for the
   README's figures (medians of 15 rounds).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit import LLMClient

FILLER = ("Here is a note about the history of lighthouses, their keepers and the ships they guided "
          "through storms along rocky coasts. ")
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
PATH_TARGETS = (500, 1500, 3000)


def grow(client: LLMClient, name: str, target: int) -> list[dict[str, Any]]:
    """A conversation of about ``target`` tokens whose every turn is distinct (named ``name``)."""
    history: list[dict[str, Any]] = [SYSTEM]
    i = 0
    while client.count_tokens(history) < target:
        history.append({"role": "user", "content": f"{name}, note {i}: {FILLER}{FILLER}"})
        history.append({"role": "assistant", "content": f"Thanks, I noted point {i} of {name}. {FILLER}"})
        i += 1
    return history


def streamed_ttft(client: LLMClient, messages: list[dict[str, Any]]) -> tuple[float, str]:
    start = time.perf_counter()
    ttft = None
    text = []
    for chunk in client.chat.completions.create(messages=messages, max_tokens=4, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(text)


def interleaved(model: str, backend: str, threads: int | None, rounds: int, history_tokens: int) -> dict[str, Any]:
    clients = {slots: LLMClient(model, backend=backend, temperature=0, context_length=2048, n_threads=threads,
                                kv_slots=slots).load() for slots in (4, 1)}
    names = ["Ada", "Bob", "Cy", "Di"]
    histories = {slots: [grow(c, n, history_tokens) for n in names] for slots, c in clients.items()}
    ttfts: dict[int, list[float]] = {4: [], 1: []}
    replies: dict[int, list[str]] = {4: [], 1: []}
    for round_ in range(rounds + 1):  # round 0 fills the slots (cold for both): not counted
        for slots, client in clients.items():
            for k in range(len(names)):
                messages = [*histories[slots][k], {"role": "user", "content": f"Round {round_}: one word?"}]
                ttft, text = streamed_ttft(client, messages)
                histories[slots][k] = [*messages, {"role": "assistant", "content": text}]
                if round_:
                    ttfts[slots].append(ttft)
                    replies[slots].append(text)
    decode = {}
    for slots, client in clients.items():
        start = time.perf_counter()
        r = client.chat.completions.create(messages=[{"role": "user", "content": "Write a story."}], max_tokens=64)
        decode[slots] = r.usage.completion_tokens / (time.perf_counter() - start)
    prompt_tokens = clients[4].count_tokens(histories[4][0])
    for client in clients.values():
        client.close()
    return {"ttft_4_slots_s": statistics.median(ttfts[4]), "ttft_1_slot_s": statistics.median(ttfts[1]),
            "ratio": statistics.median(ttfts[4]) / statistics.median(ttfts[1]),
            "turns": len(ttfts[4]), "final_prompt_tokens": prompt_tokens,
            "same_replies": replies[4] == replies[1], "decode_tok_s_4_slots": decode[4],
            "decode_tok_s_1_slot": decode[1]}


class ForwardClock:
    """Wraps a backend's forward to sum the time spent in it."""

    def __init__(self, client: LLMClient) -> None:
        self.spent = 0.0
        backend = client.engine.backend
        inner = backend.forward

        def timed(tokens: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(tokens)
            finally:
                self.spent += time.perf_counter() - start

        backend.forward = timed  # type: ignore[method-assign]


def warm_turn(client: LLMClient, clock: ForwardClock, history: list[dict[str, Any]], number: int) -> dict[str, float]:
    """One measured warm turn after ``history``: its request path's own time and its forward time."""
    # Every measured turn starts from the same history (memory copies it; the encoder's memos
    # still know it), so that its size is the one reported, not one grown by each run.
    client.clear_memory()
    client.add_to_memory(history)
    # Both turns are new to the encoder's memos, as in a real conversation: the question and
    # the reply to it differ from run to run, and so does the measured message.
    question = {"role": "user", "content": f"Question {number}: say something about the number {number}."}
    client.chat.completions.create(messages=[question], max_tokens=8)  # the previous turn: warm
    history_tokens = client.count_tokens(client.memory)
    clock.spent = 0.0
    start = time.perf_counter()
    client.chat.completions.create(messages=[{"role": "user", "content": f"And then, after {number}?"}], max_tokens=1)
    total = time.perf_counter() - start
    return {"path_s": total - clock.spent, "forward_s": clock.spent, "history_tokens": history_tokens}


def request_path(model: str, backend: str, threads: int | None) -> dict[str, Any]:
    client = LLMClient(model, backend=backend, temperature=0, context_length=4096, n_threads=threads).load()
    encoder = client.engine.encoder
    clock = ForwardClock(client)
    boundaries = encoder._boundaries
    out: dict[str, Any] = {}
    turns = itertools.count()

    def turn(history: list[dict[str, Any]], incremental: bool) -> dict[str, float]:
        encoder._boundaries = boundaries if incremental else ()
        encoder.prefix_reuse = incremental
        return warm_turn(client, clock, history, next(turns))

    client.enable_memory(max_tokens=8000)
    # Every size and mode takes its turn round after round: flat in history length is a
    # comparison across sizes, and this VM's speed drifts by tens of percent from hour to hour.
    names = ("Ada", "Bob", "Cy")  # a conversation per size: none extends another
    histories = {target: grow(client, name, target) for target, name in zip(PATH_TARGETS, names, strict=True)}
    result = side_by_side({f"{target}/{mode}": functools.partial(turn, history, mode == "incremental")
                           for target, history in histories.items() for mode in ("incremental", "whole")})
    for target in PATH_TARGETS:
        modes = {mode: result[f"{target}/{mode}"] for mode in ("incremental", "whole")}
        out[str(target)] = {"history_tokens": modes["incremental"]["history_tokens"],
                            **{f"{k}_{m}": v for k, r in modes.items() for m, v in r.items()}}
    client.disable_memory()
    encoder._boundaries, encoder.prefix_reuse = boundaries, True
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["llama.cpp", "transformers"])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["interleaved", "path"])
    parser.add_argument("--out", default="throughput")
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    table = ["Four conversations interleaved round-robin, TTFT per turn (median), kv_slots=4 vs kv_slots=1", "",
             "| model | backend | prompt tokens | 4 slots ms | 1 slot ms | 4 / 1 | same replies | "
             "decode tok/s 4 / 1 |", "|---|---|---|---|---|---|---|---|"]
    path_table = ["", "Request path's own time of a warm turn, memory on (create() minus forward passes), median",
                  "", "| model | backend | history tokens | incremental ms | whole ms | forward ms |",
                  "|---|---|---|---|---|---|"]
    for model in args.models:
        for backend in args.backends:
            if "interleaved" not in args.skip:
                r = interleaved(model, backend, args.threads, args.rounds, args.history)
                rows[f"{model}/{backend}/interleaved"] = r
                table.append(f"| {model} | {backend} | {r['final_prompt_tokens']} | {r['ttft_4_slots_s'] * 1e3:.1f} | "
                             f"{r['ttft_1_slot_s'] * 1e3:.1f} | **{r['ratio']:.3f}x** | {r['same_replies']} | "
                             f"{r['decode_tok_s_4_slots']:.1f} / {r['decode_tok_s_1_slot']:.1f} |")
            if "path" not in args.skip:
                p = request_path(model, backend, args.threads)
                rows[f"{model}/{backend}/request_path"] = p
                for target, v in p.items():
                    path_table.append(f"| {model} | {backend} | {v['history_tokens']} (~{target}) | "
                                      f"{v['incremental_path_s'] * 1e3:.2f} | {v['whole_path_s'] * 1e3:.2f} | "
                                      f"{v['incremental_forward_s'] * 1e3:.1f} |")
    write_results(args.out, {"threads": args.threads, "results": rows}, table + path_table)


if __name__ == "__main__":
    main()
