"""Warm/cold time to first token and the request path's own time on a GPU (issue 13), transformers backend.

A random-weight Llama with a 1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, SmolLM2's tokenizer and chat template, bfloat16) is built on the device, saved with the
tokenizer files into a temporary folder and loaded as any model folder would be:
``LLMClient(model_path=folder, backend="transformers", device=..., dtype=..., temperature=0)``.
Random weights answer gibberish: nothing is asserted on text and replies are kept short.

Sections (each one is wrapped: a failure is recorded and the others still run and are written):

1. **TTFT, warm vs cold**, memory on, at about 500, 1,500 and 3,000 history tokens. Each sample
   resets the memory to the history, sends a priming question (the previous turn, so the
   history is in the KV cache), then the timed streamed request (``max_tokens=4``). Cold: the
   same, but ``backend.clear_cache()`` between the priming turn and the timed request. Two
   figures: time to the first content chunk (what a user sees; random tokens can be held back
   as partial UTF-8) and time to the end of the first forward pass (prefill done, the first
   token's logits on the host), plus the tokens that first forward was fed.
2. **Request path**: as ``bench_throughput.request_path``: wall time of ``create(max_tokens=1)``
   on a warm turn, memory on, minus the time inside ``backend.forward``/``forward_all``.
   Incremental encoding against whole tokenization (``engine.encoder._boundaries = ()``,
   ``prefix_reuse = False``), and against whole rendering and tokenization
   (``incremental_render = False`` too).
3. **Model floor**: the backend's own ``forward`` with no request path: a cold prefill of the
   whole prompt against a warm forward of the new tokens a warm turn feeds (measured in 1),
   and one decode step. The best warm/cold ratio the library could reach on this model.
4. **A growing conversation** (``novel``): sections 1-3 repeat each sample's exact lengths, so a
   kernel planned per shape is paid for once there; here no length repeats, as in a real chat.
   Warm and cold turns alternate, 64-token replies are decoded, and a 23-token forward at a new
   cache length is timed against the same call repeated. Once with SDPA as torch picks it, once
   with ``torch.backends.cuda.enable_cudnn_sdp(False)``. On an H200 (torch 2.11, transformers
   5.24) torch picks cuDNN attention, which plans every new (query, key) length: 82 ms for that
   forward at a new length against 17 ms repeated, 15 against 91 decode tokens/s.
5. **CUDA graphs check** (``graphs``): the same forward passes (a prefill, decode steps, a
   verification of 9 positions, a trim and a 23-token turn, a second slot) through a client with
   ``cuda_graphs=True`` and one with ``cuda_graphs=False`` on the same weights: the largest logit
   difference and how often the argmax agrees; then one greedy chat reply from each.
6. **Profile** of warm turns at about 1,500 tokens: cProfile of the Python side and, on CUDA, a
   torch.profiler summary (``gpu.profile.txt``).

Results: benchmarks/results/gpu.json, gpu.md, gpu.profile.txt (also copied to ``--copy-to``).
Dry run on a CPU: ``python benchmarks/bench_gpu.py --tiny --device cpu --dtype float32``.
The tokenizer files come from SmolLM2 converted for transformers (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``, ``generation_config.json`` from
``$LOCAL_LLM_KIT_CACHE_DIR/transformers/<hash>/`` after loading it with ``backend="transformers"``),
copied to ``.gpu/smollm2-tok`` (git-ignored locally) so that they travel to a GPU machine.
``--cuda-graphs off`` measures the eager passes for comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, side_by_side

from local_llm_kit import LLMClient

FILLER = ("Here is a note about the history of lighthouses, their keepers and the ships they guided "
          "through storms along rocky coasts. ")
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / ".gpu" / "smollm2-tok"


def grow(client: LLMClient, name: str, target: int) -> list[dict[str, Any]]:
    """A conversation of about ``target`` tokens whose every turn is distinct (as bench_throughput's)."""
    history: list[dict[str, Any]] = [SYSTEM]
    i = 0
    while client.count_tokens(history) < target:
        history.append({"role": "user", "content": f"{name}, note {i}: {FILLER}{FILLER}"})
        history.append({"role": "assistant", "content": f"Thanks, I noted point {i} of {name}. {FILLER}"})
        i += 1
    return history


class Sync:
    """``torch.cuda.synchronize`` where the device is CUDA, else nothing."""

    def __init__(self, device: str) -> None:
        import torch

        self._sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self) -> None:
        self._sync()


class ForwardClock:
    """Wraps a backend's ``forward`` and ``forward_all``: time inside them, calls, tokens fed,
    and when the first call of a request ended (prefill done, its logits on the host)."""

    def __init__(self, client: LLMClient, sync: Sync) -> None:
        self.spent = 0.0
        self.calls: list[int] = []  # tokens fed to each call since reset()
        self.first_end: float | None = None
        backend = client.engine.backend
        for name in ("forward", "forward_all"):
            inner = getattr(backend, name)

            def timed(tokens: Any, inner: Any = inner) -> Any:
                sync()
                start = time.perf_counter()
                try:
                    return inner(tokens)  # returns numpy logits: the device is synchronized
                finally:
                    sync()
                    end = time.perf_counter()
                    self.spent += end - start
                    self.calls.append(len(tokens))
                    if self.first_end is None:
                        self.first_end = end

            setattr(backend, name, timed)

    def reset(self) -> None:
        self.spent = 0.0
        self.calls = []
        self.first_end = None


# -- setup ----------------------------------------------------------------------------------------


def build_model(folder: Path, tokenizer: Path, device: str, dtype: str, tiny: bool) -> dict[str, Any]:
    """A seeded random-weight Llama saved with SmolLM2's tokenizer files into ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    n_vocab = len(AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True))
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128) if tiny else
             dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=8192))
    config = LlamaConfig(vocab_size=n_vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=True, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, dtype)).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"parameters": params, "vocab": n_vocab, **shape, "build_and_save_s": time.perf_counter() - start}


GRAPHS = {"auto": None, "on": True, "off": False}


def graphs_check(folder: Path, device: str, dtype: str) -> dict[str, Any]:
    """The same passes with CUDA graphs on and off: logit differences and argmax agreement."""
    import random

    import numpy as np

    clients = {mode: LLMClient(model_path=str(folder), backend="transformers", device=device, dtype=dtype,
                               temperature=0, context_length=4096, cuda_graphs=GRAPHS[mode]).load()
               for mode in ("on", "off")}
    backends = {mode: c.engine.backend for mode, c in clients.items()}
    rng = random.Random(0)
    vocab = backends["on"].info.n_vocab

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    steps: list[tuple[str, Any]] = [("slot", 0), ("clear", None), ("all", ids(600))]
    steps += [("greedy", None)] * 10
    steps += [("all", ids(9)), ("trim", 5), ("all", ids(23)), ("greedy", None), ("slot", 1), ("clear", None),
              ("all", ids(300)), ("all", ids(3)), ("slot", 0), ("greedy", None), ("all", ids(130)),
              ("greedy", None)]
    diffs: list[float] = []
    agree = 0
    last: dict[str, np.ndarray] = {}
    for kind, arg in steps:
        out: dict[str, np.ndarray] = {}
        for mode, backend in backends.items():
            if kind == "slot":
                backend.use_slot(arg)
            elif kind == "clear":
                backend.truncate_cache(0)
            elif kind == "trim":
                backend.truncate_cache(len(backend.cached_tokens) - arg)
            else:
                tokens = arg if kind == "all" else [int(np.argmax(last["off"][-1]))]
                out[mode] = backend.forward_all(tokens)
        if out:
            last = out
            diffs.append(float(np.abs(out["on"] - out["off"]).max()))
            agree += int(np.array_equal(out["on"].argmax(-1), out["off"].argmax(-1)))
    messages = [{"role": "user", "content": "Write two sentences about lighthouses."}]
    replies = {mode: c.chat.completions.create(messages=messages, max_tokens=32).choices[0].message.content
               for mode, c in clients.items()}
    graphs = backends["on"].cuda_graphs  # type: ignore[attr-defined]
    for c in clients.values():
        c.close()
    return {"passes": len(diffs), "argmax_agree": agree, "max_abs_diff": max(diffs), "diffs": diffs,
            "graphs_captured": graphs, "same_reply": replies["on"] == replies["off"], "replies": replies}


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__, **machine()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return env


# -- sections -------------------------------------------------------------------------------------


class Bench:
    def __init__(self, client: LLMClient, sync: Sync, runs: int) -> None:
        self.client = client
        self.engine = client.engine
        self.backend = client.engine.backend
        self.sync = sync
        self.runs = runs
        self.clock = ForwardClock(client, sync)
        self.counter = 0
        self.histories: dict[int, list[dict[str, Any]]] = {}

    def history(self, target: int) -> list[dict[str, Any]]:
        if target not in self.histories:
            self.histories[target] = grow(self.client, "Ada", target)
        return self.histories[target]

    def _reset_memory(self, target: int) -> None:
        self.client.enable_memory(max_tokens=8000)
        self.client.clear_memory()
        self.client.add_to_memory(self.history(target))

    def ttft_turn(self, target: int, cold: bool) -> dict[str, float]:
        """One sample: the previous turn (history cached), then the timed streamed request."""
        client = self.client
        self._reset_memory(target)
        self.counter += 1
        client.chat.completions.create(messages=[{"role": "user", "content": f"Question {self.counter}: one word?"}],
                                       max_tokens=1)
        if cold:
            self.backend.clear_cache()
        messages = [{"role": "user", "content": f"Summarise note {self.counter} in one line."}]
        self.sync()
        self.clock.reset()
        start = time.perf_counter()
        ttft: float | None = None
        for chunk in client.chat.completions.create(messages=messages, max_tokens=4, stream=True):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
        total = time.perf_counter() - start
        first_end = self.clock.first_end
        return {"ttft_s": ttft if ttft is not None else total, "content_seen": float(ttft is not None),
                "prefill_s": (first_end - start) if first_end is not None else total,
                "first_forward_tokens": float(self.clock.calls[0] if self.clock.calls else 0),
                "total_s": total, "forward_s": self.clock.spent}

    def ttft(self, targets: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for target in targets:
            result = side_by_side({"warm": lambda t=target: self.ttft_turn(t, False),
                                   "cold": lambda t=target: self.ttft_turn(t, True)}, runs=self.runs)
            prompt = self.engine.encode(self.client.memory)
            warm, cold = result["warm"], result["cold"]
            out[str(target)] = {"prompt_tokens": len(prompt), "warm": warm, "cold": cold,
                                "ratio_ttft": warm["ttft_s"] / cold["ttft_s"],
                                "ratio_prefill": warm["prefill_s"] / cold["prefill_s"]}
            print(f"ttft ~{target}: {json.dumps(out[str(target)])}", flush=True)
        self.client.disable_memory()
        return out

    def path_turn(self, incremental_tokenize: bool, incremental_render: bool) -> dict[str, float]:
        engine, client = self.engine, self.client
        engine.encoder._boundaries = self._boundaries if incremental_tokenize else ()
        engine.encoder.prefix_reuse = incremental_tokenize
        engine.encoder.incremental_render = incremental_render
        self.counter += 1
        client.chat.completions.create(messages=[{"role": "user", "content": f"Question {self.counter}: one word?"}],
                                       max_tokens=1)  # the previous turn: the next one is warm
        self.sync()
        self.clock.reset()
        start = time.perf_counter()
        client.chat.completions.create(messages=[{"role": "user", "content": "And then?"}], max_tokens=1)
        total = time.perf_counter() - start
        return {"path_s": total - self.clock.spent, "forward_s": self.clock.spent, "total_s": total,
                "forward_tokens": float(sum(self.clock.calls))}

    def request_path(self, targets: list[int]) -> dict[str, Any]:
        self._boundaries = self.engine.encoder._boundaries
        out: dict[str, Any] = {"incremental_tokenization_available": bool(self._boundaries)}
        try:
            for target in targets:
                self._reset_memory(target)
                result = side_by_side({"incremental": lambda: self.path_turn(True, True),
                                       "whole_tokenize": lambda: self.path_turn(False, True),
                                       "whole_render_tokenize": lambda: self.path_turn(False, False)},
                                      runs=self.runs)
                out[str(target)] = {"history_tokens": len(self.engine.encode(self.client.memory)), **result}
                print(f"path ~{target}: {json.dumps(out[str(target)])}", flush=True)
                self.client.disable_memory()
        finally:
            self.engine.encoder._boundaries = self._boundaries
            self.engine.encoder.prefix_reuse = True
            self.engine.encoder.incremental_render = True
            self.client.disable_memory()
        return out

    def floor(self, targets: list[int], new_tokens: dict[str, float]) -> dict[str, Any]:
        """The backend's forward alone: cold prefill vs the warm turn's new tokens vs one decode step."""
        out: dict[str, Any] = {}
        for target in targets:
            ids = self.engine.encode([*self.history(target), {"role": "user", "content": "Summarise the notes."}])
            k = max(1, min(len(ids) - 1, int(new_tokens.get(str(target), 16))))
            r = side_by_side({"cold_prefill": lambda ids=ids: self._cold(ids),
                              "warm_new_tokens": lambda ids=ids, k=k: self._warm(ids, k),
                              "decode_step": lambda ids=ids: self._warm(ids, 1)}, runs=self.runs)
            out[str(target)] = {"prompt_tokens": len(ids), "warm_tokens": k,
                                **{name: v["s"] for name, v in r.items()},
                                "ratio": r["warm_new_tokens"]["s"] / r["cold_prefill"]["s"]}
            print(f"floor ~{target}: {json.dumps(out[str(target)])}", flush=True)
        self.backend.clear_cache()
        return out

    def _timed_forward(self, tokens: list[int]) -> dict[str, float]:
        self.sync()
        start = time.perf_counter()
        self.backend.forward(tokens)
        self.sync()
        return {"s": time.perf_counter() - start}

    def _cold(self, ids: list[int]) -> dict[str, float]:
        self.backend.clear_cache()
        return self._timed_forward(ids)

    def _warm(self, ids: list[int], k: int) -> dict[str, float]:
        """The last ``k`` of ``ids`` fed after the others, which are in the cache."""
        backend = self.backend
        if list(backend.cached_tokens) != ids:
            backend.clear_cache()
            backend.forward(ids)
        backend.truncate_cache(len(ids) - k)
        return self._timed_forward(ids[len(ids) - k:])

    def pass_costs(self, target: int) -> dict[str, Any]:
        """What one more position costs in a decode pass: ``forward`` of 1 token against 9 (a
        draft of 8 and the chosen token) at the same cache length, as speculation's PassCosts
        learns it."""
        ids = self.engine.encode([*self.history(target), {"role": "user", "content": "Summarise the notes."}])
        r = side_by_side({"one": lambda: self._warm(ids, 1), "nine": lambda: self._warm(ids, 9)}, runs=self.runs)
        self.backend.clear_cache()
        one, nine = r["one"]["s"], r["nine"]["s"]
        return {"prompt_tokens": len(ids), "one_s": one, "nine_s": nine,
                "extra_share": max(0.0, nine - one) / 8 / one}

    def speculation(self, max_tokens: int) -> dict[str, Any]:
        """Greedy decode tok/s with ``prompt_lookup`` off and on (cost-aware drafts of up to 8).

        Random weights answer gibberish that soon repeats itself, which prompt lookup drafts
        well: this measures the mechanism on this engine (verification passes, the KV trims,
        the cost decision), not the acceptance a trained model would see on a copying task.
        """
        from local_llm_kit.speculation import PromptLookup, SpeculationStats

        messages = [{"role": "user", "content": f"Repeat this note word for word: {FILLER}{FILLER}"}]
        replies: dict[bool, str] = {}

        def rate(on: bool) -> dict[str, float]:
            self.backend.clear_cache()
            first = last = None
            pieces: list[str] = []
            tokens = 0
            for chunk in self.client.chat.completions.create(messages=messages, max_tokens=max_tokens, stream=True,
                                                             prompt_lookup=8 if on else False,
                                                             stream_options={"include_usage": True}):
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    first = first if first is not None else now
                    last = now
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            replies[on] = "".join(pieces)
            assert first is not None and last is not None and tokens > 1
            return {"tok_s": (tokens - 1) / max(last - first, 1e-9), "tokens": float(tokens)}

        stats = PromptLookup.stats = SpeculationStats()
        try:
            r = side_by_side({"off": lambda: rate(False), "on": lambda: rate(True)}, runs=self.runs)
        finally:
            PromptLookup.stats = None
        return {"off_tok_s": r["off"]["tok_s"], "on_tok_s": r["on"]["tok_s"], "ratio": r["on"]["tok_s"] /
                r["off"]["tok_s"], "tokens": r["off"]["tokens"], "same_reply": replies[False] == replies[True],
                "acceptance": stats.accepted / max(stats.drafted, 1),
                "tokens_per_pass": stats.accepted / max(stats.verifications, 1) + 1,
                "declined": stats.declined, "learned_extra_share": self.engine.pass_costs.extra_share}

    def novel(self, target: int) -> dict[str, Any]:
        """Turns whose lengths never repeat, as in a real chat, with torch's default SDPA backend
        choice and with the cuDNN SDPA backend turned off (``enable_cudnn_sdp(False)``).

        The sections above repeat each sample's exact shapes (same history, same question
        length), so a backend that plans per shape pays only once there. Here the conversation
        grows turn after turn: warm and cold turns alternate, then replies of 64 tokens are decoded,
        then the backend's forward of 23 tokens at a new cache length is timed against the same
        call repeated at once (same shape).
        """
        import torch

        out: dict[str, Any] = {}
        for config, name in (("default", "Ada"), ("cudnn_sdp_off", "Bea")):
            enabled = torch.backends.cuda.cudnn_sdp_enabled()
            if config == "cudnn_sdp_off":
                torch.backends.cuda.enable_cudnn_sdp(False)
            try:
                out[config] = self._novel_one(target, name)
            except Exception:
                out[config] = {"error": traceback.format_exc()}
            finally:
                torch.backends.cuda.enable_cudnn_sdp(enabled)
                self.client.disable_memory()
            print(f"novel {config}: {json.dumps(out[config])}", flush=True)
        return out

    def _novel_one(self, target: int, name: str) -> dict[str, Any]:
        client, backend = self.client, self.backend
        history = grow(client, name, target)
        client.enable_memory(max_tokens=8000)
        client.clear_memory()
        client.add_to_memory(history)
        client.chat.completions.create(messages=[{"role": "user", "content": "First question: one word?"}],
                                       max_tokens=1)
        samples: dict[str, list[dict[str, float]]] = {"warm": [], "cold": []}
        for i in range(2 * self.runs):
            cold = bool(i % 2)
            if cold:
                backend.clear_cache()
            self.sync()
            self.clock.reset()
            start = time.perf_counter()
            ttft: float | None = None
            messages = [{"role": "user", "content": f"{name}, turn {i}: what about note {i}?"}]
            for chunk in client.chat.completions.create(messages=messages, max_tokens=4, stream=True):
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - start
            total = time.perf_counter() - start
            first_end = self.clock.first_end
            samples["cold" if cold else "warm"].append(
                {"ttft_s": ttft if ttft is not None else total,
                 "prefill_s": (first_end - start) if first_end is not None else total,
                 "first_forward_tokens": float(self.clock.calls[0] if self.clock.calls else 0)})
        prompt_tokens = len(self.engine.encode(client.memory))
        result: dict[str, Any] = {"prompt_tokens_at_end": prompt_tokens}
        for kind, rows in samples.items():
            result[kind] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        result["ratio_ttft"] = result["warm"]["ttft_s"] / result["cold"]["ttft_s"]
        result["ratio_prefill"] = result["warm"]["prefill_s"] / result["cold"]["prefill_s"]
        decode: list[float] = []
        step: list[float] = []
        tokens: list[int] = []
        for i in range(2):
            self.sync()
            self.clock.reset()
            start = time.perf_counter()
            r = client.chat.completions.create(
                messages=[{"role": "user", "content": f"{name}, write story {i} about the lighthouses."}],
                max_tokens=64)
            elapsed = time.perf_counter() - start
            decode.append(r.usage.completion_tokens / elapsed)
            tokens.append(r.usage.completion_tokens)
            calls = self.clock.calls
            step.append(self.clock.spent / max(1, len(calls)))
        result["decode_tok_s"] = statistics.median(decode)
        result["decode_tokens"] = tokens
        result["forward_per_call_s"] = statistics.median(step)
        client.disable_memory()
        ids = self.engine.encode([*history, {"role": "user", "content": "Summarise the notes."}])
        new_shape: list[float] = []
        same_shape: list[float] = []
        for j in range(self.runs):
            n = len(ids) - 24 - 3 * j
            backend.clear_cache()
            backend.forward(ids[:n])
            new_shape.append(self._timed_forward(ids[n:n + 23])["s"])
            backend.truncate_cache(n)
            same_shape.append(self._timed_forward(ids[n:n + 23])["s"])
        backend.clear_cache()
        result["forward_23_new_length_s"] = statistics.median(new_shape)
        result["forward_23_same_length_s"] = statistics.median(same_shape)
        return result

    def profile(self, target: int, device: str) -> str:
        """cProfile of warm turns (Python side) and a torch.profiler summary of one warm and one cold turn."""
        parts: list[str] = []
        self._boundaries = self.engine.encoder._boundaries
        self._reset_memory(target)
        for _ in range(2):
            self.path_turn(True, True)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            self.path_turn(True, True)
        profiler.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(30)
            parts.append(f"== cProfile, 5 warm turns (2 create() each) at ~{target} history tokens, by {key}\n"
                         + buf.getvalue())
        self.client.disable_memory()
        if device.startswith("cuda"):
            import torch
            from torch.profiler import ProfilerActivity, profile

            for cold in (False, True):
                self.ttft_turn(target, cold)  # warm-up of this exact path
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    self.ttft_turn(target, cold)
                    torch.cuda.synchronize()
                events = prof.key_averages()
                kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
                parts.append(f"== torch.profiler, one {'cold' if cold else 'warm'} TTFT sample at ~{target} "
                             f"(priming turn + timed turn), {kernels} CUDA kernel launches\n"
                             + events.table(sort_by="self_cuda_time_total", row_limit=20)
                             + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=20))
            self.client.disable_memory()
        return "\n\n".join(parts)


# -- output ---------------------------------------------------------------------------------------


def table(payload: dict[str, Any]) -> list[str]:
    env = payload.get("environment", {})
    m, ld = payload.get("model") or {}, payload.get("load") or {}
    lines = [f"Issue 13 on {env.get('gpu', env.get('processor', '?'))} ({payload.get('device')}, "
             f"{payload.get('dtype')}), torch {env.get('torch')}, transformers {env.get('transformers')}: "
             f"random-weight Llama, {m.get('parameters', 0) / 1e9:.2f}B parameters (hidden {m.get('hidden_size')}, "
             f"{m.get('num_hidden_layers')} layers), SmolLM2 tokenizer, attention {ld.get('attn_implementation')}, "
             f"kv_slots {ld.get('kv_slots')}, CUDA graphs {(ld.get('backend_info') or {}).get('cuda_graphs')} "
             f"(--cuda-graphs {payload.get('cuda_graphs')}), {payload.get('runs')} runs per figure", ""]
    ttft = payload.get("ttft") or {}
    if isinstance(ttft, dict) and ttft and "error" not in ttft:
        lines += ["TTFT of the next turn, memory on: warm (history in the KV cache) vs cold (cache cleared), "
                  "median; every sample repeats the same lengths, so per-shape planning is paid once (see the "
                  "growing-conversation table for lengths that never repeat)", "",
                  "| history tokens | warm TTFT ms | cold TTFT ms | warm/cold TTFT | warm prefill ms | "
                  "cold prefill ms | warm/cold prefill | tokens fed warm / cold |", "|---|---|---|---|---|---|---|---|"]
        for target, v in ttft.items():
            w, c = v["warm"], v["cold"]
            lines.append(f"| {v['prompt_tokens']} (~{target}) | {w['ttft_s'] * 1e3:.1f} | {c['ttft_s'] * 1e3:.1f} | "
                         f"**{v['ratio_ttft']:.3f}x** | {w['prefill_s'] * 1e3:.1f} | {c['prefill_s'] * 1e3:.1f} | "
                         f"{v['ratio_prefill']:.3f}x | {w['first_forward_tokens']:.0f} / "
                         f"{c['first_forward_tokens']:.0f} |")
    path = payload.get("request_path") or {}
    if isinstance(path, dict) and path and "error" not in path:
        lines += ["", "Request path's own time of a warm turn, memory on (create(max_tokens=1) minus forward "
                  "passes), median", "",
                  "| history tokens | incremental ms | whole tokenize ms | whole render+tokenize ms | "
                  "forward ms (incremental) |", "|---|---|---|---|---|"]
        for target, v in path.items():
            if not isinstance(v, dict):
                continue
            lines.append(f"| {v['history_tokens']} (~{target}) | {v['incremental']['path_s'] * 1e3:.2f} | "
                         f"{v['whole_tokenize']['path_s'] * 1e3:.2f} | "
                         f"{v['whole_render_tokenize']['path_s'] * 1e3:.2f} | "
                         f"{v['incremental']['forward_s'] * 1e3:.1f} |")
    floor = payload.get("floor") or {}
    if isinstance(floor, dict) and floor and "error" not in floor:
        lines += ["", "Model floor: backend.forward alone (no request path), median", "",
                  "| prompt tokens | cold prefill ms | warm forward ms (tokens) | warm/cold | decode step ms |",
                  "|---|---|---|---|---|"]
        for target, v in floor.items():
            lines.append(f"| {v['prompt_tokens']} (~{target}) | {v['cold_prefill'] * 1e3:.1f} | "
                         f"{v['warm_new_tokens'] * 1e3:.1f} ({v['warm_tokens']}) | {v['ratio']:.3f}x | "
                         f"{v['decode_step'] * 1e3:.1f} |")
    novel = payload.get("novel") or {}
    if isinstance(novel, dict) and novel and "error" not in novel:
        lines += ["", "A growing conversation (no length repeats, as in a real chat), memory on, warm and cold turns "
                  "alternating, median; SDPA as torch picks it vs with the cuDNN SDPA backend off", "",
                  "| SDPA | prompt tokens at end | warm TTFT ms | cold TTFT ms | warm/cold | decode tok/s (64) | "
                  "forward per call ms | 23-token forward, new length ms | same length again ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for config, v in novel.items():
            if "error" in v:
                lines.append(f"| {config} | failed: {v['error'].splitlines()[-1]} |")
                continue
            lines.append(f"| {config} | {v['prompt_tokens_at_end']} | {v['warm']['ttft_s'] * 1e3:.1f} | "
                         f"{v['cold']['ttft_s'] * 1e3:.1f} | **{v['ratio_ttft']:.3f}x** | {v['decode_tok_s']:.1f} | "
                         f"{v['forward_per_call_s'] * 1e3:.1f} | {v['forward_23_new_length_s'] * 1e3:.1f} | "
                         f"{v['forward_23_same_length_s'] * 1e3:.1f} |")
    costs, spec = payload.get("pass_costs") or {}, payload.get("speculation") or {}
    if costs and "error" not in costs:
        lines += ["", f"Pass costs at {costs['prompt_tokens']} cached tokens: forward of 1 token "
                  f"{costs['one_s'] * 1e3:.2f} ms, of 9 tokens {costs['nine_s'] * 1e3:.2f} ms: one more position costs "
                  f"**{costs['extra_share']:.3f}** of a pass (speculation drafts where the expected tokens per pass "
                  "beat that cost)"]
    if spec and "error" not in spec:
        lines += ["", "Prompt-lookup speculation, greedy, 128 tokens, random weights (their gibberish repeats itself): "
                  "decode tok/s off vs on", "",
                  "| off tok/s | on tok/s | on / off | drafted tokens kept | tokens per pass | declined drafts | "
                  "learned extra share | same reply |", "|---|---|---|---|---|---|---|---|",
                  f"| {spec['off_tok_s']:.1f} | {spec['on_tok_s']:.1f} | **{spec['ratio']:.2f}x** | "
                  f"{spec['acceptance']:.0%} | {spec['tokens_per_pass']:.2f} | {spec['declined']} | "
                  f"{spec['learned_extra_share']:.3f} | {spec['same_reply']} |"]
    errors = {k: v["error"] for k, v in payload.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "Sections that failed:", *(f"- {k}: {v.splitlines()[-1]}" for k, v in errors.items())]
    graphs = payload.get("graphs") or {}
    if isinstance(graphs, dict) and graphs and "error" not in graphs:
        lines += ["", "CUDA graphs on vs off, the same passes on the same weights", "",
                  "| passes | argmax agrees | largest logit difference | graphs captured | same greedy reply |",
                  "|---|---|---|---|---|",
                  f"| {graphs['passes']} | {graphs['argmax_agree']} | {graphs['max_abs_diff']:.2e} | "
                  f"{graphs['graphs_captured']} | {graphs['same_reply']} |"]
    return lines


def write(name: str, payload: dict[str, Any], copy_to: Path | None, profile: str | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    files = {f"{name}.json": json.dumps({"benchmark": name, "date": time.strftime("%Y-%m-%d"), **payload},
                                        indent=2) + "\n",
             f"{name}.md": "\n".join(table(payload)) + "\n"}
    if profile is not None:
        files[f"{name}.profile.txt"] = profile
    for file, text in files.items():
        (RESULTS / file).write_text(text)
        if copy_to is not None:
            (copy_to / file).write_text(text)


def section(payload: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        payload[key] = fn()
    except Exception:
        payload[key] = {"error": traceback.format_exc()}
        print(f"section {key} failed:\n{payload[key]['error']}", flush=True)
    print(f"section {key}: {time.perf_counter() - start:.1f} s", flush=True)
    return payload[key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers: a dry run of the script")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="folder with SmolLM2's tokenizer.json, tokenizer_config.json, chat_template.jinja")
    parser.add_argument("--targets", type=int, nargs="+", default=[500, 1500, 3000])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["ttft", "path", "floor", "speculation", "novel", "graphs", "profile"])
    parser.add_argument("--cuda-graphs", choices=sorted(GRAPHS), default="auto",
                        help="LLMClient(cuda_graphs=...): auto (the default), on or off")
    parser.add_argument("--copy-to", type=Path, default=None, help="also write the result files here ($OUT)")
    parser.add_argument("--out", default="gpu")
    args = parser.parse_args()
    payload: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "runs": args.runs,
                               "cuda_graphs": args.cuda_graphs}
    section(payload, "environment", lambda: environment(args.device))
    print(json.dumps(payload["environment"]), flush=True)
    sync = Sync(args.device)
    with tempfile.TemporaryDirectory(prefix="llk-gpu-") as tmp:
        folder = Path(tmp)
        model = section(payload, "model", lambda: build_model(folder, args.tokenizer, args.device, args.dtype,
                                                              args.tiny))
        if "error" in model:
            write(args.out, payload, args.copy_to)
            raise SystemExit(1)
        clients: list[LLMClient] = []

        def load() -> dict[str, Any]:
            start = time.perf_counter()
            client = LLMClient(model_path=str(folder), backend="transformers", device=args.device,
                               dtype=args.dtype, temperature=0, context_length=4096,
                               cuda_graphs=GRAPHS[args.cuda_graphs]).load()
            clients.append(client)
            backend = client.engine.backend
            return {"load_s": time.perf_counter() - start, "backend_info": dict(backend.info.extra),
                    "kv_slots": backend.n_slots,
                    "attn_implementation": str(getattr(backend.model.config, "_attn_implementation", None))}

        loaded = section(payload, "load", load)
        print(json.dumps(payload["model"]), json.dumps(loaded), flush=True)
        if not clients:
            write(args.out, payload, args.copy_to)
            raise SystemExit(1)
        client = clients[0]
        bench = Bench(client, sync, args.runs)
        profile: str | None = None
        if "ttft" not in args.skip:
            section(payload, "ttft", lambda: bench.ttft(args.targets))
            write(args.out, payload, args.copy_to)
        if "path" not in args.skip:
            section(payload, "request_path", lambda: bench.request_path(args.targets))
            write(args.out, payload, args.copy_to)
        if "floor" not in args.skip:
            ttft = payload.get("ttft") or {}
            new_tokens = {t: v["warm"]["first_forward_tokens"] for t, v in ttft.items() if "warm" in v}
            section(payload, "floor", lambda: bench.floor(args.targets, new_tokens))
            write(args.out, payload, args.copy_to)
        if "speculation" not in args.skip:
            middle = sorted(args.targets)[len(args.targets) // 2]
            section(payload, "pass_costs", lambda: bench.pass_costs(middle))
            section(payload, "speculation", lambda: bench.speculation(128))
            write(args.out, payload, args.copy_to)
        if "novel" not in args.skip:
            section(payload, "novel", lambda: bench.novel(sorted(args.targets)[len(args.targets) // 2]))
            write(args.out, payload, args.copy_to)
        if "graphs" not in args.skip:
            section(payload, "graphs", lambda: graphs_check(folder, args.device, args.dtype))
            write(args.out, payload, args.copy_to)
        if "profile" not in args.skip:
            middle = sorted(args.targets)[len(args.targets) // 2]
            holder: dict[str, str] = {}

            def run_profile() -> dict[str, Any]:
                holder["text"] = bench.profile(middle, args.device)
                return {"target": middle}

            section(payload, "profile", run_profile)
            profile = holder.get("text")
        client.close()
    write(args.out, payload, args.copy_to, profile)
    print("\n".join(table(payload)), flush=True)
    if any(isinstance(v, dict) and "error" in v for v in payload.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
