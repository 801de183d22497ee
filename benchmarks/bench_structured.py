"""Constrained decoding speed: JSON output against free text, and against llama-cpp-python's grammar path.

Side by side, per packaged model, on the llama.cpp backend, greedy, same threads, same rendered
prompt (the JSON request's own prompt, system instruction included), median of 5 after a warm-up:

- ours, unconstrained: ``create()`` on the prompt the JSON request renders, no response_format;
- ours, constrained: ``create(response_format={"type": "json_schema", ...})``;
- llama-cpp-python, unconstrained and with ``response_format={"type": "json_object", "schema": ...}``
  (its GBNF grammar path), through ``create_chat_completion`` on the same messages.

Decode tokens/s counts every token after the first (forced tokens included: they are real
output tokens, evaluated in one batch) over the time after the first. Also reported: our
constraint's time per token (check, occasional mask, consume and fast-forward) p50/p99; the
time of a full mask (compute + apply) at every step of the same reply p50/p99 (what a naive
loop would pay), and at every step of a free-text reply under the ``tool_choice="auto"`` grammar,
where the check-first loop avoids it; grammar compile
time cold (new cache) vs cached (a cache hit plus a matcher copy).

    python benchmarks/bench_structured.py [--models ...] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import side_by_side, write_results

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.backends.llama_cpp import default_threads
from local_llm_kit.chat import select_output_mode
from local_llm_kit.constraints import (
    CallSyntax,
    ConstraintStats,
    GrammarCache,
    GrammarConstraint,
    grammar_cache,
    json_schema_grammar,
    tool_call_grammar,
)
from local_llm_kit.request import validate_request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "species": {"enum": ["cat", "dog", "rabbit", "parrot"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "indoor": {"type": "boolean"},
        "description": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "species", "age", "colours", "indoor", "description"],
}
MESSAGES = [{"role": "user", "content": "Describe Tom, a lazy three-year-old ginger cat who loves naps, "
                                        "in detail."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e6 if values else float("nan")


def stream_ours(client: LLMClient, **kwargs: Any) -> dict[str, float]:
    client.engine.backend.truncate_cache(0)
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.chat.completions.create(max_tokens=kwargs.pop("max_tokens"), stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif first is None and chunk.choices[0].delta.content:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {"decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens, "ttft_ms": (first - start) * 1e3}


def stream_theirs(peer: llama_cpp.Llama, messages: list[dict[str, Any]], max_tokens: int,
                  response_format: dict[str, Any] | None) -> dict[str, float]:
    peer.reset()
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in peer.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                             response_format=response_format, stream=True):  # type: ignore[arg-type]
        if chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {"decode_tok_s": (tokens - 1) / (end - first), "tokens": tokens, "ttft_ms": (first - start) * 1e3}


def full_mask_times(client: LLMClient, grammar: str, text: str) -> list[float]:
    """Seconds of one full mask (compute + apply) at every step of ``text`` under ``grammar``."""
    backend = client.engine.backend
    compiled = grammar_cache.compile(backend.llg_tokenizer(), grammar, param="bench")
    constraint = GrammarConstraint(compiled, backend.info.n_vocab, backend.info.eos_token_ids)
    constraint._forced_first = []  # measure real masks from the first step on
    logits = np.zeros(backend.info.n_vocab, dtype=np.float32)
    times = []
    pending = backend.tokenize(text)
    while pending:
        logits[:] = 0.0
        started = time.perf_counter()
        constraint.mask_logits(logits)
        times.append(time.perf_counter() - started)
        token = pending.pop(0)
        if not np.isfinite(logits[token]):
            break
        forced = constraint.consume(token)
        if pending[: len(forced)] != forced:
            break
        del pending[: len(forced)]
    return times


CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jsonschemabench"  # <repo>/../shared


def compile_times(client: LLMClient) -> dict[str, float]:
    """Grammar compile time, cold (a new cache) and cached (a hit plus the per-request matcher copy):
    for the benchmark schema (median of 7), and over the JSONSchemaBench corpus when it is here."""
    tokenizer = client.engine.backend.llg_tokenizer()

    def once(schema: Any) -> tuple[float, float] | None:
        cache = GrammarCache()
        started = time.perf_counter()
        try:
            cache.compile(tokenizer, json_schema_grammar(schema), param="bench")
        except (InvalidRequestError, ValueError):
            return None
        cold = time.perf_counter() - started
        started = time.perf_counter()
        cache.compile(tokenizer, json_schema_grammar(schema), param="bench").matcher()
        return cold, time.perf_counter() - started

    runs = [once(SCHEMA) for _ in range(7)]
    result = {"compile_cold_ms": statistics.median(r[0] for r in runs if r) * 1e3,
              "compile_cached_ms": statistics.median(r[1] for r in runs if r) * 1e3}
    if CORPUS.is_dir():
        corpus = [once(json.loads(p.read_text())) for p in sorted(CORPUS.glob("*/*.json"))]
        cold = [r[0] for r in corpus if r]
        cached = [r[1] for r in corpus if r]
        result.update({"corpus_schemas": len(corpus), "corpus_compiled": len(cold),
                       "corpus_cold_ms": {"p50": pct(cold, 50) / 1e3, "p99": pct(cold, 99) / 1e3,
                                          "max": max(cold) * 1e3},
                       "corpus_cached_ms": {"p50": pct(cached, 50) / 1e3, "p99": pct(cached, 99) / 1e3,
                                            "max": max(cached) * 1e3}})
    return result


def bench_model(model: str, max_tokens: int, threads: int) -> dict[str, Any]:
    """Every figure of one model; see the module docstring."""
    client = LLMClient(model, temperature=0, n_threads=threads).load()
    client.disable_memory()
    engine = client.engine
    request = validate_request({"messages": MESSAGES, "response_format": FORMAT}, default_temperature=0.0,
                               default_top_p=1.0, n_vocab=engine.backend.info.n_vocab)
    prepared = select_output_mode(engine, request).prepare_messages(request.messages)  # same prompt for all
    peer = llama_cpp.Llama(model_path=str(client.resolved_model.path), n_ctx=2048, n_threads=threads,
                           n_threads_batch=threads, verbose=False, swa_full=True)
    contenders = {
        "ours, free text": lambda: stream_ours(client, messages=prepared, max_tokens=max_tokens),
        "ours, JSON schema": lambda: stream_ours(client, messages=MESSAGES, response_format=FORMAT,
                                                 max_tokens=max_tokens),
        "llama-cpp-python, free text": lambda: stream_theirs(peer, prepared, max_tokens, None),
        "llama-cpp-python, JSON schema (GBNF)": lambda: stream_theirs(
            peer, prepared, max_tokens, {"type": "json_object", "schema": SCHEMA}),
    }
    results = side_by_side(contenders)

    GrammarConstraint.stats = stats = ConstraintStats()
    reply = client.chat.completions.create(messages=MESSAGES, response_format=FORMAT, max_tokens=max_tokens)
    GrammarConstraint.stats = None
    text = reply.choices[0].message.content or ""
    free = client.chat.completions.create(messages=MESSAGES, max_tokens=max_tokens).choices[0].message.content
    json_masks = full_mask_times(client, json_schema_grammar(SCHEMA), text)
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    syntax = CallSyntax("<tool_call>", "</tool_call>", "", "arguments")
    auto = tool_call_grammar([("get_weather", weather)], syntax, content="text", parallel=True)
    text_masks = full_mask_times(client, auto, free or "")
    peer.close()
    return {
        "model": model, "n_vocab": engine.backend.info.n_vocab, "results": results,
        "constraint_step_us": {"p50": pct(stats.step_seconds, 50), "p99": pct(stats.step_seconds, 99)},
        "masks_built": len(stats.mask_seconds), "sampled_tokens": stats.sampled_tokens,
        "forced_tokens": stats.forced_tokens,
        "full_mask_json_us": {"p50": pct(json_masks, 50), "p99": pct(json_masks, 99),
                              "steps": len(json_masks)},
        "full_mask_text_us": {"p50": pct(text_masks, 50), "p99": pct(text_masks, 99),
                              "steps": len(text_masks)},
        **compile_times(client),
        "sample_reply": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for both engines (1 is steadier on a loaded machine)")
    args = parser.parse_args()
    threads = args.threads
    models = [bench_model(m, args.max_tokens, threads) for m in args.models]
    table = [f"Constrained decoding, llama.cpp backend, {threads} threads, greedy, max {args.max_tokens} new "
             "tokens, median of 5 (decode tok/s after the first token)", "",
             "| model | path | decode tok/s | vs ours free text | tokens |", "|---|---|---|---|---|"]
    for m in models:
        base = m["results"]["ours, free text"]["decode_tok_s"]
        for name, r in m["results"].items():
            table.append(f"| {m['model']} | {name} | {r['decode_tok_s']:.1f} "
                         f"| {r['decode_tok_s'] / base:.2f}x | {r['tokens']:.0f} |")
    table += ["", "| model | vocab | ours/free (JSON) | theirs/free (GBNF) | constraint µs/token p50 / p99 "
              "| full mask µs JSON p50 / p99 | full mask µs auto-mode text p50 / p99 "
              "| compile ms cold / cached |",
              "|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = m["results"]
        ours = r["ours, JSON schema"]["decode_tok_s"] / r["ours, free text"]["decode_tok_s"]
        theirs = (r["llama-cpp-python, JSON schema (GBNF)"]["decode_tok_s"]
                  / r["llama-cpp-python, free text"]["decode_tok_s"])
        table.append(
            f"| {m['model']} | {m['n_vocab']} | {ours:.2f}x | {theirs:.2f}x "
            f"| {m['constraint_step_us']['p50']:.0f} / {m['constraint_step_us']['p99']:.0f} "
            f"| {m['full_mask_json_us']['p50']:.0f} / {m['full_mask_json_us']['p99']:.0f} "
            f"| {m['full_mask_text_us']['p50']:.0f} / {m['full_mask_text_us']['p99']:.0f} "
            f"| {m['compile_cold_ms']:.2f} / {m['compile_cached_ms']:.3f} |")
    corpus = [m for m in models if "corpus_cold_ms" in m]
    if corpus:
        table += ["", "Grammar compile over the JSONSchemaBench corpus (schemas that compile), ms", "",
                  "| model | compiled | cold p50 / p99 / max | cached p50 / p99 / max |", "|---|---|---|---|"]
        for m in corpus:
            c, h = m["corpus_cold_ms"], m["corpus_cached_ms"]
            table.append(f"| {m['model']} | {m['corpus_compiled']}/{m['corpus_schemas']} "
                         f"| {c['p50']:.2f} / {c['p99']:.1f} / {c['max']:.1f} "
                         f"| {h['p50']:.3f} / {h['p99']:.3f} / {h['max']:.3f} |")
    write_results("structured", {"threads": threads, "max_tokens": args.max_tokens, "schema": SCHEMA,
                                 "models": models}, table)


if __name__ == "__main__":
    main()
