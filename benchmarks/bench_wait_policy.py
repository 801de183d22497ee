"""llama.cpp's OpenMP wait policy: decode speed on a quiet machine and with busy cores.

llama.cpp (built with OpenMP, as llama-cpp-python builds it) meets its worker threads at a
barrier after every operation of every token. With libgomp's default policy the threads that
arrive first spin; when another process takes a core, the thread they wait for is descheduled
and the spinners burn whole time slices, so decoding collapses. ``OMP_WAIT_POLICY=PASSIVE``
makes them sleep at once; ``GOMP_SPINCOUNT`` bounds the spin before they sleep. libgomp reads
both when it is loaded, so each policy runs in a fresh process (``--child``), and the policies
take turns round by round, with and without processes that keep cores busy.

    python benchmarks/bench_wait_policy.py --busy 0 1 --runs 5

One thread is a contender too: it meets no barrier, so it cannot collapse. So is the library's
default (since this benchmark: decode steps on half the cores, prefill on all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results

from local_llm_kit.backends.llama_cpp import default_threads

# name -> (environment, threads: None for the library's default)
POLICIES: dict[str, tuple[dict[str, str], int | None]] = {
    "all cores (spin)": ({}, 0),
    "all cores, PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "all cores, GOMP_SPINCOUNT=10000": ({"GOMP_SPINCOUNT": "10000"}, 0),
    "1 thread (no barriers)": ({}, 1),
    "library default": ({}, None),
}
PROMPT = [{"role": "user", "content": "Write a short paragraph about the sea."}]


def child(threads: int | None, max_tokens: int) -> None:
    """One measurement in this process: decode tokens/s of a greedy streamed reply, cold cache."""
    from local_llm_kit import LLMClient

    client = LLMClient("smollm2-135m-instruct", temperature=0, n_threads=threads, kv_slots=1).load()
    client.chat.completions.create(messages=PROMPT, max_tokens=4)  # warm-up: first-call allocations
    client.engine.backend.clear_cache()
    first = last = None
    tokens = 0
    for chunk in client.chat.completions.create(messages=PROMPT, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert first is not None and last is not None and tokens > 1
    print(json.dumps({"tok_s": (tokens - 1) / (last - first), "tokens": tokens}))
    client.close()


def measure(policy: dict[str, str], threads: int | None, max_tokens: int, timeout: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(policy)
    command = [sys.executable, __file__, "--child", "--max-tokens", str(max_tokens)]
    if threads is not None:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return 0.0  # slower than max_tokens / timeout: reported as 0
    return float(json.loads(done.stdout.strip().splitlines()[-1])["tok_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # for --child
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy-looping processes beside it")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one measurement may take")
    parser.add_argument("--out", default="wait_policy")
    args = parser.parse_args()
    if args.child:
        child(args.threads, args.max_tokens)
        return
    rates: dict[str, dict[int, list[float]]] = {name: {busy: [] for busy in args.busy} for name in POLICIES}
    for busy in args.busy:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for _ in range(args.runs):
                for name, (policy, threads) in POLICIES.items():
                    if threads == 0:  # every core the library would use for a prefill
                        threads = default_threads()
                    rates[name][busy].append(measure(policy, threads, args.max_tokens, args.timeout))
        finally:
            for hog in hogs:
                hog.kill()
    results: dict[str, Any] = {name: {str(busy): {"median_tok_s": statistics.median(values), "runs": values}
                                      for busy, values in by_busy.items()} for name, by_busy in rates.items()}
    baseline = {busy: statistics.median(rates["all cores (spin)"][busy]) for busy in args.busy}
    header = " | ".join(f"{busy} busy: tok/s (vs all cores, spinning)" for busy in args.busy)
    table = [f"| policy | {header} |", "|---" * (1 + len(args.busy)) + "|"]
    for name, by_busy in rates.items():
        cells = [f"{statistics.median(v):.1f} ({statistics.median(v) / max(baseline[b], 1e-9):.2f}x)"
                 for b, v in by_busy.items()]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    write_results(args.out, {"cpu_count": os.cpu_count(), "max_tokens": args.max_tokens,
                             "busy": args.busy, "runs": args.runs, "results": results}, table)


if __name__ == "__main__":
    main()
