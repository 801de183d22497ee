"""Helpers shared by the benchmarks: medians of repeated runs and result files.

Every figure is measured side by side with its peer in one run, same model file, same threads,
greedy, after a warm-up; results are JSON in benchmarks/results/ plus a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def side_by_side(contenders: dict[str, Callable[[], dict[str, float]]], runs: int = RUNS,
                 warmup: int = 1) -> dict[str, dict[str, float]]:
    """Run the contenders in turn, round after round, so that a change in the machine's load
    touches all of them alike; the median of each figure per contender."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            samples[name].append(fn())
    return {name: {key: statistics.median(s[key] for s in runs_) for key in runs_[0]}
            for name, runs_ in samples.items()}


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "processor": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_results(name: str, payload: dict[str, Any], table: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
