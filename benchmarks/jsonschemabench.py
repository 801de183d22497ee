"""Structured output valid at every finish, on the JSONSchemaBench corpus (240 schemas).

The corpus is read from ``<repo>/../shared/data/jsonschemabench``. For every backend and every
``max_tokens`` (64 and 256 by default), greedy:

- coverage: the share of schemas accepted (``strict`` absent: what the grammar cannot enforce is
  checked after generation; a rejected schema raises ``InvalidRequestError``, never falls back);
- validity: for each schema, ``response_format={"type": "json_schema", ...}``; the share of
  replies that parse and validate (``jsonschema``) **whatever their finish_reason** (the target is
  100%: a reply cut by ``max_tokens`` is closed by the grammar), and the share that stopped
  naturally (``finish_reason == "stop"``); replies flagged with ``schema_violations`` (a keyword the
  grammar could not enforce, e.g. ``uniqueItems``) are counted apart;
- for the Glaive function schemas, the same for a forced tool call (``tool_choice`` naming it);
- speed: the constrained replies' tokens/s against unconstrained replies on the same prompt (the
  JSON request's own, instruction included) and the same ``max_tokens``, run right after each
  other from an empty KV cache: end to end (total tokens over total seconds, prompt prefill
  included) and decode only (the prompt's prefill, timed once per schema with a one-token free
  request, taken off both; the first token comes with the prefill, so it is not counted). The
  end-to-end ratio favours the longer replies: constrained replies often end after a few dozen
  tokens, free ones run to ``max_tokens``, and a long schema prompt's prefill is spread over fewer
  tokens.

Writes benchmarks/results/jsonschemabench.json and a markdown table.

    python benchmarks/jsonschemabench.py [--backends llama.cpp transformers] [--limit N] [--max-tokens 64 256]

``--limit`` takes an evenly spaced sample of N schemas per folder (coverage is always measured on
every schema).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results

from local_llm_kit import InvalidRequestError, LLMClient, TokenLimitError
from local_llm_kit.formats import JsonSpec
from local_llm_kit.request import validate_request
from local_llm_kit.structured import select_output_mode

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jsonschemabench"
FOLDERS = ("Glaiveai2K", "Github_easy", "Github_medium", "Snowplow", "Kubernetes")
ASK = "Write one realistic example JSON document for this schema."
logger = logging.getLogger("jsonschemabench")


def load_corpus(root: Path) -> list[tuple[str, Path, Any]]:
    if not root.is_dir():
        raise SystemExit(f"the JSONSchemaBench corpus is missing: expected it at {root}")
    corpus = []
    for folder in FOLDERS:
        for path in sorted((root / folder).glob("*.json")):
            corpus.append((folder, path, json.loads(path.read_text())))
    return corpus


def sample(items: list[Any], limit: int | None) -> list[Any]:
    if limit is None or len(items) <= limit:
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def check(value_text: str, schema: Any) -> str:
    """'valid', or why not."""
    try:
        value = json.loads(value_text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    try:
        validator = jsonschema.validators.validator_for(schema)
        validator(schema).validate(value)
    except jsonschema.ValidationError as exc:
        return f"invalid: {exc.message[:200]}"
    except jsonschema.SchemaError as exc:
        return f"schema rejected by the jsonschema package: {exc.message[:200]}"
    return "valid"


def function_name(path: Path) -> str:
    return re.sub(r"_[0-9a-f]{8}$", "", path.stem)[:64] or "f"


def coverage(client: LLMClient, corpus: list[tuple[str, Path, Any]]) -> tuple[dict[str, bool], dict[str, Any]]:
    accepted: dict[str, bool] = {}
    details: dict[str, Any] = {}
    for folder, path, schema in corpus:
        key = f"{folder}/{path.name}"
        args = {"messages": [{"role": "user", "content": ASK}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}}
        request = validate_request(args, default_temperature=0.0, default_top_p=1.0,
                                   n_vocab=client.engine.backend.info.n_vocab)
        try:
            output = select_output_mode(client.engine, request)
            accepted[key] = True
            unenforced = output._content_check.unenforced  # type: ignore[attr-defined]
            if unenforced:
                details[key] = {"checked_after": list(unenforced)}
        except InvalidRequestError as exc:
            accepted[key] = False
            details[key] = {"rejected": str(exc)[:300]}
    return accepted, details


def run_backend(backend: str, model: str, corpus: list[tuple[str, Path, Any]], limit: int | None,
                budgets: list[int], cache_dir: str | None, threads: int | None,
                progress: Any = None, load_options: dict[str, Any] | None = None) -> dict[str, Any]:
    client = LLMClient(model, backend=backend, temperature=0, cache_dir=cache_dir, n_threads=threads,
                       **(load_options or {})).load()
    client.disable_memory()
    accepted, details = coverage(client, corpus)
    by_folder: dict[str, list[tuple[str, Path, Any]]] = {}
    for item in corpus:
        by_folder.setdefault(item[0], []).append(item)
    chosen = [item for folder in FOLDERS for item in sample(by_folder.get(folder, []), limit)]
    per_budget = []
    prefills: dict[str, float] = {}
    for max_tokens in budgets:
        runs: list[dict[str, Any]] = []
        started = time.perf_counter()
        for folder, path, schema in chosen:
            key = f"{folder}/{path.name}"
            if not accepted[key]:
                continue
            if key not in prefills:
                prefills[key] = free_run(client, schema, 1)["seconds"]
            client.engine.backend.clear_cache()  # every KV slot: no run reuses another's prompt
            runs.append(json_run(client, key, schema, max_tokens))
            runs[-1]["free"] = free_run(client, schema, max_tokens)
            runs[-1]["prefill_seconds"] = prefills[key]
            if folder == "Glaiveai2K":
                runs.append(tool_run(client, key, function_name(path), schema, max_tokens))
            logger.info("%s %d %s: %s %s", backend, max_tokens, key, runs[-1].get("finish_reason"),
                        runs[-1]["outcome"])
        per_budget.append({"max_tokens": max_tokens, "runs": runs, "seconds": time.perf_counter() - started,
                           "summary": summarize(runs)})
        result = {"backend": backend, "model": model, "schemas": len(corpus), "accepted": sum(accepted.values()),
                  "coverage": sum(accepted.values()) / len(corpus), "details": details,
                  "schemas_run": len(chosen), "budgets": per_budget}
        if progress is not None:  # keep what is measured, budget by budget (long runs on a busy machine)
            progress(result)
    return result


def json_run(client: LLMClient, key: str, schema: Any, max_tokens: int) -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}
    return outcome("json", key, schema, lambda: client.chat.completions.create(
        messages=[{"role": "user", "content": ASK}], response_format=fmt, max_tokens=max_tokens))


def free_run(client: LLMClient, schema: Any, max_tokens: int) -> dict[str, float]:
    """The same prompt (system instruction included) without the grammar: the speed reference."""
    note = JsonSpec(schema, "example").instruction()
    client.engine.backend.clear_cache()
    started = time.perf_counter()
    response = client.chat.completions.create(
        messages=[{"role": "system", "content": note}, {"role": "user", "content": ASK}], max_tokens=max_tokens)
    return {"seconds": time.perf_counter() - started, "completion_tokens": response.usage.completion_tokens}


def tool_run(client: LLMClient, key: str, name: str, schema: Any, max_tokens: int) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
    choice = {"type": "function", "function": {"name": name}}
    return outcome("tool", key, schema, lambda: client.chat.completions.create(
        messages=[{"role": "user", "content": f"Call {name} with realistic arguments."}], tools=tools,
        tool_choice=choice, max_tokens=max_tokens))


def outcome(kind: str, key: str, schema: Any, request: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = request()
    except TokenLimitError as exc:
        return {"kind": kind, "schema": key, "outcome": "prompt too long", "detail": str(exc)[:200]}
    except InvalidRequestError as exc:  # e.g. max_tokens below the shortest valid reply
        return {"kind": kind, "schema": key, "outcome": "rejected", "detail": str(exc)[:300]}
    choice = response.choices[0]
    seconds = time.perf_counter() - started
    entry: dict[str, Any] = {"kind": kind, "schema": key, "finish_reason": choice.finish_reason,
                             "seconds": seconds, "completion_tokens": response.usage.completion_tokens}
    if kind == "json":
        text = choice.message.content or ""
    else:
        calls = choice.message.tool_calls or []
        text = calls[0].function.arguments if len(calls) == 1 else ""
    entry["output"] = text[:2000]
    entry["outcome"] = check(text, schema)
    if choice.message.schema_violations:
        entry["schema_violations"] = choice.message.schema_violations
        if entry["outcome"] != "valid":
            entry["outcome"] = "flagged"  # parses; a keyword the grammar could not enforce is broken, and said so
    return entry


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in ("json", "tool"):
        mine = [r for r in runs if r["kind"] == kind]
        generated = [r for r in mine if "finish_reason" in r]
        valid = [r for r in generated if r["outcome"] == "valid"]
        flagged = [r for r in generated if r["outcome"] == "flagged"]
        natural = [r for r in generated if r["finish_reason"] in ("stop", "tool_calls")]
        result[kind] = {"runs": len(mine), "generated": len(generated), "valid": len(valid),
                        "flagged": len(flagged), "stopped": len(natural),
                        "not_generated": {r["schema"]: r["outcome"] for r in mine if "finish_reason" not in r}}
    constrained = [r for r in runs if r["kind"] == "json" and "finish_reason" in r]
    tokens = sum(r["completion_tokens"] for r in constrained)
    seconds = sum(r["seconds"] for r in constrained)
    free_tokens = sum(r["free"]["completion_tokens"] for r in constrained)
    free_seconds = sum(r["free"]["seconds"] for r in constrained)
    result["speed"] = {"constrained_tok_s": tokens / seconds if seconds else None,
                       "free_tok_s": free_tokens / free_seconds if free_seconds else None}
    if seconds and free_seconds and free_tokens:
        result["speed"]["ratio"] = (tokens / seconds) / (free_tokens / free_seconds)
    # Runs whose prefill, timed apart, took longer than one of the two replies (a busy shared
    # machine) say nothing of decoding: left out of both sides.
    timed = [r for r in constrained if "prefill_seconds" in r
             and min(r["seconds"], r["free"]["seconds"]) > r["prefill_seconds"]]
    result["speed"]["decode_runs"] = len(timed)
    if timed:
        def decode_rate(entries: list[tuple[int, float, float]]) -> float | None:
            spent = sum(s - p for _, s, p in entries)
            return sum(n - 1 for n, _, _ in entries) / spent if spent else None

        ours = decode_rate([(r["completion_tokens"], r["seconds"], r["prefill_seconds"]) for r in timed])
        free = decode_rate([(r["free"]["completion_tokens"], r["free"]["seconds"], r["prefill_seconds"])
                            for r in timed])
        result["speed"].update({"constrained_decode_tok_s": ours, "free_decode_tok_s": free})
        if ours and free:
            result["speed"]["decode_ratio"] = ours / free
    return result


def table_of(results: list[dict[str, Any]], corpus_size: int, model: str) -> list[str]:
    table = [f"JSONSchemaBench ({corpus_size} schemas), {model}, greedy, strict absent", "",
             "| backend | accepted | schemas run | max_tokens | JSON parse+valid | flagged | stopped naturally "
             "| forced calls valid | calls stopped | constrained / free tok/s | decode only | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(part: int, whole: int) -> str:
        return f"{part}/{whole} ({part / whole:.0%})" if whole else "n/a"

    for r in results:
        for b in r["budgets"]:
            j, t, speed = b["summary"]["json"], b["summary"]["tool"], b["summary"]["speed"]
            ratio = f"{speed['ratio']:.2f}x" if speed.get("ratio") else "n/a"
            decode = f"{speed['decode_ratio']:.2f}x" if speed.get("decode_ratio") else "n/a"
            table.append(
                f"| {r['backend']} | {r['accepted']}/{r['schemas']} | {r['schemas_run']} | {b['max_tokens']} "
                f"| {pct(j['valid'], j['generated'])} | {j['flagged']} | {pct(j['stopped'], j['generated'])} "
                f"| {pct(t['valid'], t['generated'])} | {pct(t['stopped'], t['generated'])} | {ratio} | {decode} "
                f"| {b['seconds'] / 60:.1f} |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["llama.cpp", "transformers"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=None, help="schemas run per folder (default: all)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the library's)")
    parser.add_argument("--model-path", default=None, help="a model folder or file instead of the installed model")
    parser.add_argument("--device", default=None, help="transformers: cuda, cpu...")
    parser.add_argument("--dtype", default=None, help="transformers: float32, bfloat16...")
    parser.add_argument("--out", default="jsonschemabench", help="results file name in benchmarks/results")
    args = parser.parse_args()
    load_options = {k: v for k, v in {"model_path": args.model_path, "device": args.device,
                                      "dtype": args.dtype}.items() if v is not None}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = load_corpus(args.corpus)
    # Backends not run this time keep their previous results (e.g. runs made separately).
    kept: list[dict[str, Any]] = []
    previous = RESULTS / f"{args.out}.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("model") == args.model:
            kept = [r for r in old.get("backends", []) if r["backend"] not in args.backends and "budgets" in r]
    results: list[dict[str, Any]] = []

    def save(partial: dict[str, Any] | None = None) -> None:
        current = results + ([{**partial, "limit": args.limit, "threads": args.threads}] if partial else [])
        write_results(args.out, {"model": args.model, "backends": kept + current},
                      table_of(kept + current, len(corpus), args.model))

    for backend in args.backends:
        result = run_backend(backend, args.model, corpus, args.limit, args.max_tokens, args.cache_dir,
                             args.threads, progress=save, load_options=load_options)
        results.append({**result, "limit": args.limit, "threads": args.threads})
    save()


if __name__ == "__main__":
    main()
