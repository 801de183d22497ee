"""Coverage and validity on the JSONSchemaBench sample in /work/shared/data/jsonschemabench (240 schemas).

For every schema and backend:

- coverage: does the engine compile it (``response_format`` accepted), or does the request raise
  ``InvalidRequestError`` with the engine's reason (never a silent fallback);
- validity: a greedy completion with ``response_format={"type": "json_schema", ...}``; every one
  that finishes with ``finish_reason == "stop"`` must parse and validate (``jsonschema``);
- for the Glaive function schemas, the same for a forced tool call (``tool_choice`` naming the
  function): every call that finishes with ``"tool_calls"`` must validate.

Writes benchmarks/results/jsonschemabench.json and prints a markdown table.

    python benchmarks/jsonschemabench.py [--backends llama.cpp transformers] [--limit N] [--max-tokens 256]

``--limit`` takes an evenly spaced sample per folder (coverage is always measured on every schema).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results

from local_llm_kit import InvalidRequestError, LLMClient, TokenLimitError
from local_llm_kit.constraints import grammar_cache, json_schema_grammar

CORPUS = Path("/work/shared/data/jsonschemabench")
FOLDERS = ("Glaiveai2K", "Github_easy", "Github_medium", "Snowplow", "Kubernetes")
logger = logging.getLogger("jsonschemabench")


def load_corpus(root: Path) -> list[tuple[str, Path, Any]]:
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


def run_backend(backend: str, model: str, corpus: list[tuple[str, Path, Any]], limit: int | None,
                max_tokens: int, cache_dir: str | None, threads: int | None) -> dict[str, Any]:
    client = LLMClient(model, backend=backend, temperature=0, cache_dir=cache_dir, n_threads=threads).load()
    client.disable_memory()
    tokenizer = client.engine.backend.llg_tokenizer()
    compiled: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for folder, path, schema in corpus:  # coverage on everything
        key = f"{folder}/{path.name}"
        try:
            grammar_cache.compile(tokenizer, json_schema_grammar(schema), param="response_format")
            compiled[key] = True
        except (InvalidRequestError, ValueError, TypeError) as exc:
            compiled[key] = False
            reasons[key] = str(exc)[:300]
    runs: list[dict[str, Any]] = []
    by_folder: dict[str, list[tuple[str, Path, Any]]] = {}
    for item in corpus:
        by_folder.setdefault(item[0], []).append(item)
    started = time.perf_counter()
    for folder in FOLDERS:
        for _, path, schema in sample(by_folder.get(folder, []), limit):
            key = f"{folder}/{path.name}"
            if not compiled[key]:
                continue
            runs.append(json_run(client, key, schema, max_tokens))
            if folder == "Glaiveai2K":
                runs.append(tool_run(client, key, function_name(path), schema, max_tokens))
            logger.info("%s %s: %s", backend, key, runs[-1]["outcome"])
    elapsed = time.perf_counter() - started
    return {"backend": backend, "model": model, "schemas": len(corpus), "compiled": sum(compiled.values()),
            "coverage": sum(compiled.values()) / len(corpus), "rejected": reasons, "runs": runs,
            "seconds": elapsed, "summary": summarize(runs)}


def json_run(client: LLMClient, key: str, schema: Any, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Write one realistic example JSON document for this schema."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}
    return outcome("json", key, schema, lambda: client.chat.completions.create(
        messages=messages, response_format=fmt, max_tokens=max_tokens))


def tool_run(client: LLMClient, key: str, name: str, schema: Any, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Call {name} with realistic arguments."}]
    tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
    choice = {"type": "function", "function": {"name": name}}
    return outcome("tool", key, schema, lambda: client.chat.completions.create(
        messages=messages, tools=tools, tool_choice=choice, max_tokens=max_tokens))


def outcome(kind: str, key: str, schema: Any, request: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = request()
    except TokenLimitError as exc:
        return {"kind": kind, "schema": key, "outcome": "prompt too long", "detail": str(exc)[:200]}
    except InvalidRequestError as exc:
        return {"kind": kind, "schema": key, "outcome": "rejected", "detail": str(exc)[:300]}
    choice = response.choices[0]
    seconds = time.perf_counter() - started
    entry = {"kind": kind, "schema": key, "finish_reason": choice.finish_reason, "seconds": seconds,
             "completion_tokens": response.usage.completion_tokens}
    if kind == "json":
        text = choice.message.content or ""
        done = choice.finish_reason == "stop"
    else:
        calls = choice.message.tool_calls or []
        text = calls[0].function.arguments if calls else ""
        done = choice.finish_reason == "tool_calls"
    entry["output"] = text[:2000]
    entry["outcome"] = check(text, schema) if done else "length"
    return entry


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in ("json", "tool"):
        mine = [r for r in runs if r["kind"] == kind]
        finished = [r for r in mine if r["outcome"] not in ("length", "prompt too long", "rejected")]
        valid = [r for r in finished if r["outcome"] == "valid"]
        result[kind] = {"runs": len(mine), "finished": len(finished), "valid": len(valid),
                        "validity": len(valid) / len(finished) if finished else None,
                        "outcomes": dict(Counter(r["outcome"].split(":")[0] for r in mine))}
    return result


def table_of(results: list[dict[str, Any]], corpus_size: int, model: str) -> list[str]:
    table = [f"JSONSchemaBench sample ({corpus_size} schemas), {model}, greedy", "",
             "| backend | coverage (compiled) | schemas run | max_tokens | JSON finished (stop) "
             "| valid / finished | forced tool calls | finished | valid / finished | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def share(part: dict[str, Any]) -> str:
        if part["validity"] is None:
            return "n/a"
        return f"{part['valid']}/{part['finished']} ({part['validity']:.0%})"

    for r in results:
        j, t = r["summary"]["json"], r["summary"]["tool"]
        run = "all compiled" if r.get("limit") is None else f"{r['limit']} per folder"
        table.append(f"| {r['backend']} | {r['compiled']}/{r['schemas']} ({r['coverage']:.1%}) | {run} "
                     f"| {r.get('max_tokens')} | {j['finished']}/{j['runs']} | {share(j)} | {t['runs']} "
                     f"| {t['finished']} | {share(t)} | {r['seconds'] / 60:.1f} |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["llama.cpp", "transformers"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=None, help="schemas run per folder (default: all)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the library's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = load_corpus(args.corpus)
    results = []
    for backend in args.backends:
        result = run_backend(backend, args.model, corpus, args.limit, args.max_tokens, args.cache_dir,
                             args.threads)
        results.append({**result, "limit": args.limit, "max_tokens": args.max_tokens,
                        "threads": args.threads})
    # Backends not run this time keep their previous results (e.g. a full llama.cpp run and a
    # sampled transformers run made separately).
    previous = RESULTS / "jsonschemabench.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("model") == args.model:
            ran = {r["backend"] for r in results}
            results = [r for r in old.get("backends", []) if r["backend"] not in ran] + results
    write_results("jsonschemabench", {"model": args.model, "backends": results},
                  table_of(results, len(corpus), args.model))


if __name__ == "__main__":
    main()
