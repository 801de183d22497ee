"""Prompt-lookup speculation: decode tokens/s with drafts against without, on the same client.

Tasks: three that copy from their input (fields of a passage into a JSON schema, a quoted
document, a tool call that repeats the user's details) and free chat (little to copy, where
speculation must not slow decoding down). Each task runs with ``prompt_lookup`` off and on, round
by round on one loaded model (greedy, same prompt, KV cache cleared before each run so both start
cold), and the replies are checked to be identical. Decode tokens/s excludes the prefill: it is
completion tokens after the first over the time from the first streamed token to the last.
"copied" is the share of the plain reply's tokens that end a 4-token run found earlier in the
prompt or reply: how much the model actually copied, which bounds what drafting can gain.

    python benchmarks/bench_speculation.py --backends llama.cpp transformers

Threads default to the library's own choice (decode steps on half the cores, batches on all of them
up to 8; before, all cores for both), which is what a user gets; on a
small CPU the answer depends on it (see the README), so tables say which they used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit import LLMClient
from local_llm_kit.speculation import PromptLookup, SpeculationStats

DOCUMENT = (
    "Maintenance notice. The north pier of Harbour Road bridge will close from 6 May to 19 May for "
    "resurfacing. Pedestrians can use the temporary walkway on the east side, which is open from 6 am "
    "to 10 pm every day. Cyclists must dismount on the walkway. Deliveries to the fish market will use "
    "the south gate, and lorries over 7.5 tonnes are diverted via Mill Lane and the ring road. Questions "
    "go to the harbour office at 14 Quay Street, telephone 0117 496 0321, open Monday to Friday."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "structure": {"type": "string"}, "closed_from": {"type": "string"}, "closed_until": {"type": "string"},
        "walkway": {"type": "string"}, "walkway_hours": {"type": "string"}, "diversion": {"type": "string"},
        "office_address": {"type": "string"}, "telephone": {"type": "string"},
    },
    "required": ["structure", "closed_from", "closed_until", "walkway", "walkway_hours", "diversion",
                 "office_address", "telephone"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {
    "name": "file_complaint", "description": "File a complaint with the harbour office",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string"}, "address": {"type": "string"}, "telephone": {"type": "string"},
        "complaint": {"type": "string"}}, "required": ["name", "address", "telephone", "complaint"]}}}
TASKS: dict[str, dict[str, Any]] = {
    "extract to JSON schema": {
        "messages": [{"role": "user", "content": f"{DOCUMENT}\n\nExtract the details of this notice as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "notice", "schema": SCHEMA}},
    },
    "quote a document": {
        "messages": [{"role": "system", "content": f"Answer by quoting this document exactly.\n\n{DOCUMENT}"},
                     {"role": "user", "content": "Quote the sentences about the walkway and the deliveries."}],
    },
    "repeat into a tool call": {
        "messages": [{"role": "user", "content": "File a complaint for me. I am Margaret Okonkwo-Hale of 27 "
                      "Lighthouse Terrace, Clifton, Bristol BS8 4PJ, telephone 0117 496 0874. My complaint: the "
                      "temporary walkway on the east side of Harbour Road bridge has no lighting after 8 pm."}],
        "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "file_complaint"}},
    },
    "free chat": {"messages": [{"role": "user", "content": "Tell me a short story about a fox and a crow."}]},
}


class Runner:
    """One loaded client; remembers each reply so that off and on can be compared."""

    def __init__(self, client: LLMClient, max_tokens: int) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.replies: dict[tuple[str, bool], str] = {}

    def decode_rate(self, task: str, prompt_lookup: bool) -> dict[str, float]:
        self.client.engine.backend.clear_cache()  # both contenders start cold
        first = last = None
        text = []
        tokens = 0
        stream = self.client.chat.completions.create(
            stream=True, max_tokens=self.max_tokens, prompt_lookup=prompt_lookup,
            stream_options={"include_usage": True}, **TASKS[task])
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                delta = chunk.choices[0].delta
                piece = (delta.content or "") + "".join(c.function.arguments or "" for c in delta.tool_calls or []
                                                        if c.function is not None)
                if piece:
                    first = first if first is not None else now
                    last = now
                    text.append(piece)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        assert first is not None and last is not None and tokens > 1
        self.replies[(task, prompt_lookup)] = "".join(text)
        return {"tok_s": (tokens - 1) / max(last - first, 1e-9), "tokens": float(tokens)}


def copied_share(prompt: list[int], reply: list[int], span: int = 4) -> float:
    """The share of ``reply``'s tokens that end a run of ``span`` tokens found earlier in the prompt
    or the reply: what prompt lookup can draft after a match of that length. It measures how much
    the model copied, which bounds what speculation can gain, whatever the pass costs."""
    sequence = list(prompt)
    seen = {tuple(sequence[i:i + span]) for i in range(len(sequence) - span + 1)}
    copied = 0
    for token in reply:
        sequence.append(token)
        gram = tuple(sequence[-span:])
        copied += gram in seen
        seen.add(gram)
    return copied / max(len(reply), 1)


def run(model: str, backend: str, threads: int | None, max_tokens: int, runs: int,
        load_options: dict[str, Any]) -> dict[str, Any]:
    client = LLMClient(model, backend=backend, temperature=0, n_threads=threads, kv_slots=1, **load_options).load()
    runner = Runner(client, max_tokens)
    out: dict[str, Any] = {}
    for task in TASKS:
        stats = PromptLookup.stats = SpeculationStats()
        result = side_by_side({
            "off": lambda t=task: runner.decode_rate(t, False),
            "on": lambda t=task: runner.decode_rate(t, True),
        }, runs=runs)
        PromptLookup.stats = None
        prompt = client.engine.encode(TASKS[task]["messages"], tools=TASKS[task].get("tools"))
        reply = client.engine.backend.tokenize(runner.replies[(task, False)])
        out[task] = {"copied": copied_share(prompt, reply),
                     "off_tok_s": result["off"]["tok_s"], "on_tok_s": result["on"]["tok_s"],
                     "ratio": result["on"]["tok_s"] / result["off"]["tok_s"], "tokens": result["off"]["tokens"],
                     "same_reply": runner.replies[(task, False)] == runner.replies[(task, True)],
                     "acceptance": stats.accepted / max(stats.drafted, 1),
                     "tokens_per_verification": stats.accepted / max(stats.verifications, 1) + 1}
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["llama.cpp", "transformers"])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the library's choice)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5, help="rounds per task (median)")
    parser.add_argument("--out", default="speculation", help="results file name in benchmarks/results")
    parser.add_argument("--model-path", default=None, help="a model folder or file instead of an installed model")
    parser.add_argument("--device", default=None, help="transformers: cuda, cpu...")
    parser.add_argument("--dtype", default=None, help="transformers: float32, bfloat16...")
    args = parser.parse_args()
    load_options = {k: v for k, v in {"model_path": args.model_path, "device": args.device,
                                      "dtype": args.dtype}.items() if v is not None}
    results: dict[str, Any] = {}
    table = ["| backend | model | task | tokens | copied | off tok/s | on tok/s | on/off | drafts kept "
             "| tokens / pass | same reply |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backend in args.backends:
        for model in args.models:
            res = run(model, backend, args.threads, args.max_tokens, args.runs, load_options)
            results[f"{backend}/{model}"] = res
            for task, r in res.items():
                table.append(f"| {backend} | {model} | {task} | {r['tokens']:.0f} | {r['copied']:.0%} | "
                             f"{r['off_tok_s']:.1f} | {r['on_tok_s']:.1f} | {r['ratio']:.2f}x | "
                             f"{r['acceptance']:.0%} | {r['tokens_per_verification']:.2f} | {r['same_reply']} |")
    write_results(args.out, {"threads": args.threads, "cpu_count": os.cpu_count(),  # threads None: the default
                             "max_tokens": args.max_tokens, "results": results}, table)


if __name__ == "__main__":
    main()
