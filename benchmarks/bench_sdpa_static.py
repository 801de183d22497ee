"""SDPA kernels for a few queries against a whole static KV cache under a mask (issue 13, CUDA).

A padded CUDA-graph pass (``local_llm_kit.backends._cuda_graphs``) attends every position of its
slot's static cache, masked past the real ones. This times one layer's attention of that shape
(32 query heads, 8 KV heads, head size 64, bfloat16, the keys repeated to the query heads as
transformers does under a mask) with each SDPA kernel, and flash attention on exactly the real
keys without any mask as a floor (its sums differ: it is timed, not compared). Median of 50
CUDA-event timings after 10 warm-ups. Results: benchmarks/results/sdpa_static.txt.

    python benchmarks/bench_sdpa_static.py [--keys 4224] [--real 1650]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn: Callable[[], object], runs: int = 50) -> float:
    """Median microseconds of ``fn`` on the GPU (CUDA events), after 10 warm-ups."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=4224)
    parser.add_argument("--real", type=int, default=1650)
    args = parser.parse_args()
    heads, kv_heads, dim = 32, 8, 64
    out: dict[str, dict[str, float]] = {}
    for queries in (1, 9, 32, 128):
        q = torch.randn(1, heads, queries, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, args.keys, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        position = torch.arange(args.real - queries, args.real, device="cuda")
        mask = (torch.arange(args.keys, device="cuda")[None, :] <= position[:, None])[None, None]
        rk, rv = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        row: dict[str, float] = {}
        sdpa = torch.nn.functional.scaled_dot_product_attention
        masked = functools.partial(sdpa, q, rk, rv, attn_mask=mask)
        for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    row[name] = timed(masked)
            except RuntimeError as exc:
                row[name] = float("nan")
                print(f"{name} at {queries} queries: {str(exc).splitlines()[0]}")
        exact = functools.partial(sdpa, q, rk[:, :, :args.real].contiguous(), rv[:, :, :args.real].contiguous())
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # no causal mask: a timing floor, not the same sums
            row["flash_exact_keys"] = timed(exact)
        out[str(queries)] = row
        print(f"{queries} queries x {args.keys} keys (us): {json.dumps({k: round(t, 1) for k, t in row.items()})}",
              flush=True)


if __name__ == "__main__":
    main()
