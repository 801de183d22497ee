"""The HTTP server against the in-process client, and the server under load.

1. Decode speed: the same greedy request (SmolLM2 on llama.cpp, same threads) through
   ``local-llm-kit serve`` with the official ``openai`` client, and in-process with ``LLMClient``,
   interleaved round after round, median of ``BENCH_RUNS`` (5). Decode tokens/s is measured
   from the first streamed token to the last (prefill and connection set-up excluded); the
   end-to-end rate of a non-streamed request is reported beside it.
2. Load: ``--requests`` (200) requests at concurrency ``--concurrency`` (8), every other one
   streaming; every response is validated (the openai client parses it), failures counted;
   latency p50/p95.
3. Dropped streams: 50 streams closed after their first chunk; then the server must report
   nothing generating, and the next request's decode rate is compared with the baseline.
4. A burst of 40 concurrent requests at a server whose queue holds 8: some get 503, and a
   request right after is served.

The server runs in its own process, as it would in use.

    python benchmarks/bench_server.py [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai

sys.path.insert(0, os.path.dirname(__file__))
from common import RUNS, side_by_side, write_results

from local_llm_kit import LLMClient

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
LOAD_PROMPT = [{"role": "user", "content": "Name a fruit."}]
MAX_TOKENS = 128
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(threads: int, max_queue: int) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "local_llm_kit", "serve", "--model", MODEL, "--port", str(port),
               "--temperature", "0", "--n-threads", str(threads), "--api-key", KEY,
               "--max-queue", str(max_queue), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def stream_rate(chunks: Iterator[Any], content: Callable[[Any], str | None]) -> dict[str, float]:
    """Decode tokens/s from first to last content token; llama.cpp streams one token per chunk."""
    first = last = 0.0
    tokens = 0
    for chunk in chunks:
        if content(chunk):
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    return {"decode_tok_s": (tokens - 1) / (last - first), "tokens": float(tokens)}


def decode_benchmark(api: openai.OpenAI, local: LLMClient) -> dict[str, dict[str, float]]:
    def text(chunk: Any) -> str | None:
        return chunk.choices[0].delta.content if chunk.choices else None

    def via_server() -> dict[str, float]:
        figures = stream_rate(iter(api.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                               temperature=0, stream=True)), text)
        started = time.perf_counter()
        reply = api.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.usage is not None
        figures["end_to_end_tok_s"] = reply.usage.completion_tokens / (time.perf_counter() - started)
        return figures

    def in_process() -> dict[str, float]:
        figures = stream_rate(iter(local.chat.completions.create(messages=PROMPT, max_tokens=MAX_TOKENS,
                                                                 stream=True)), text)
        started = time.perf_counter()
        reply = local.chat.completions.create(messages=PROMPT, max_tokens=MAX_TOKENS)
        figures["end_to_end_tok_s"] = reply.usage.completion_tokens / (time.perf_counter() - started)
        return figures

    return side_by_side({"server (openai client)": via_server, "in-process (LLMClient)": in_process})


def load_test(url: str, requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(jobs: list[int]) -> None:
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300) as api:
            for job in jobs:
                started = time.perf_counter()
                try:
                    if job % 2:
                        text = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
                            model=MODEL, messages=LOAD_PROMPT, max_tokens=16, stream=True) if c.choices)
                    else:
                        text = api.chat.completions.create(model=MODEL, messages=LOAD_PROMPT,
                                                           max_tokens=16).choices[0].message.content or ""
                    if not text:
                        raise ValueError("empty answer")
                except Exception as exc:  # counted, the run goes on
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(list(range(i, requests, concurrency)),))
               for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": requests, "concurrency": concurrency, "failed": len(failures), "failures": failures[:5],
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": quantiles[94],
            "requests_per_s": len(latencies) / elapsed, "wall_s": elapsed}


def dropped_streams(url: str, api: openai.OpenAI, baseline: float) -> dict[str, Any]:
    for _ in range(50):
        stream = api.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.monotonic() + 60
    while (health := httpx.get(url + "/health").json())["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    rate = stream_rate(iter(api.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True)),
                       lambda c: c.choices[0].delta.content if c.choices else None)["decode_tok_s"]
    return {"dropped": 50, "health_after": health, "next_decode_tok_s": rate, "vs_baseline": rate / baseline}


def burst(url: str, size: int) -> dict[str, Any]:
    statuses: list[int] = []
    lock = threading.Lock()

    def ask() -> None:
        response = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "messages": LOAD_PROMPT, "max_tokens": 16}, timeout=300)
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=ask) for _ in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "messages": LOAD_PROMPT, "max_tokens": 8}, timeout=300)
    return {"burst": size, "ok": statuses.count(200), "rejected_503": statuses.count(503),
            "other": len(statuses) - statuses.count(200) - statuses.count(503), "after_burst_status": after.status_code}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    local = LLMClient(MODEL, temperature=0, n_threads=args.threads).load()
    with server_process(args.threads, max_queue=8) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300) as api:
        decode = decode_benchmark(api, local)
        load = load_test(url, args.requests, args.concurrency)
        dropped = dropped_streams(url, api, decode["server (openai client)"]["decode_tok_s"])
        overload = burst(url, 40)

    server, inproc = decode["server (openai client)"], decode["in-process (LLMClient)"]
    ratio = server["decode_tok_s"] / inproc["decode_tok_s"]
    e2e_ratio = server["end_to_end_tok_s"] / inproc["end_to_end_tok_s"]
    table = [
        f"Server vs in-process, {MODEL} on llama.cpp, {args.threads} threads, greedy, {MAX_TOKENS} tokens, "
        f"median of {RUNS} interleaved runs",
        "",
        "| path | decode tok/s (first to last token) | end-to-end tok/s (non-streamed) |",
        "|---|---|---|",
        f"| in-process `LLMClient` | {inproc['decode_tok_s']:.1f} | {inproc['end_to_end_tok_s']:.1f} |",
        f"| `local-llm-kit serve` + `openai` client | {server['decode_tok_s']:.1f} ({ratio:.2f}x) | "
        f"{server['end_to_end_tok_s']:.1f} ({e2e_ratio:.2f}x) |",
        "",
        f"Load: {load['requests']} requests at concurrency {load['concurrency']} (half streaming, 16 tokens each): "
        f"{load['failed']} failed, latency p50 {load['latency_p50_s']:.2f} s, p95 {load['latency_p95_s']:.2f} s, "
        f"{load['requests_per_s']:.1f} requests/s.",
        f"Dropped streams: {dropped['dropped']} closed after their first chunk, then /health reported "
        f"{dropped['health_after']['generating']} generating; the next stream decoded at "
        f"{dropped['next_decode_tok_s']:.1f} tok/s ({dropped['vs_baseline']:.2f}x the baseline).",
        f"Burst of {overload['burst']} at a queue of 8: {overload['ok']} served, {overload['rejected_503']} got 503, "
        f"{overload['other']} other; the next request got {overload['after_burst_status']}.",
    ]
    write_results("server", {"model": MODEL, "backend": "llama.cpp", "threads": args.threads,
                             "max_tokens": MAX_TOKENS, "runs": RUNS, "decode": decode,
                             "decode_ratio": ratio, "end_to_end_ratio": e2e_ratio, "load": load,
                             "dropped_streams": dropped, "burst": overload}, table)


if __name__ == "__main__":
    main()
