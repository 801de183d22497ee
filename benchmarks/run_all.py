"""Run every benchmark in turn (never two at once: they would share the two cores) and plot.

Each script writes benchmarks/results/<name>.json and <name>.md; this one then draws
benchmarks/results/<name>.png from the JSON, so the pictures always match the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SCRIPTS = ["bench_llama_cpp.py", "bench_transformers.py", "bench_kv_reuse.py", "bench_structured.py",
           "jsonschemabench.py"]


def bar_chart(name: str, labels: list[str], values: list[float], title: str, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(labels)))
    ax.barh(labels, values, color="#4878a8")
    if target is not None:
        ax.axvline(target, color="#c44", linestyle="--", label=f"target {target}x")
        ax.legend(loc="lower right")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)


def plot() -> None:
    path = RESULTS / "llama_cpp.json"
    if path.exists():
        r = json.loads(path.read_text())["results"]
        ours = r["local_llm_kit create()"]["decode_tok_s"]
        peers = [k for k in r if k != "local_llm_kit create()"]
        bar_chart("llama_cpp", [f"vs {p}" for p in peers], [ours / r[p]["decode_tok_s"] for p in peers],
                  "llama.cpp backend: our decode speed / peer's (SmolLM2)", 1.0)
    path = RESULTS / "kv_reuse.json"
    if path.exists():
        r = json.loads(path.read_text())["results"]
        bar_chart("kv_reuse", [f"{k} ({v['prompt_tokens']} tok)" for k, v in r.items()],
                  [v["ratio"] for v in r.values()], "TTFT with KV reuse / cold (lower is better)", None)


def main() -> None:
    only = sys.argv[1:]
    for script in SCRIPTS:
        if only and script not in only:
            continue
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
    plot()


if __name__ == "__main__":
    main()
