"""KV-cache slots on a static cache whose short forward passes replay as CUDA graphs.

Why. Eager PyTorch launches each of a layer's ~35 kernels from Python. On a GPU a small model's
forward pass is then bound by those launches, not by the GPU: on an H200 a 1B-shaped Llama took
11-13 ms for a forward of 23 new tokens and as long for a cold prefill of 1,600, so a warm turn's
time to first token was 1.04x a cold one's and the KV cache saved nothing
(``benchmarks/results/gpu.md`` before this module). A CUDA graph replays the recorded kernels
with one launch: with graphs that ratio is 0.24x at ~1,500 history tokens, and a decode step takes
3.0 ms instead of 21 (``gpu.md``, ``gpu_graphs_off.md``: the same H200, a minute apart).

How. A graph replays fixed shapes at fixed addresses, so each slot keeps its keys and values in a
``transformers.StaticCache`` of ``n_ctx + max(BUCKETS)`` positions, allocated whole at the slot's
first pass. A forward of ``n`` new tokens at cache position ``start`` is padded to the next
bucket size ``b`` (1, 2, 4, ..., 128): its ids, and positions ``start .. start + b - 1``. The
padding writes keys and values past the real tokens; causal masking keeps every real query from
reading them (each reads positions up to its own), and the next forward writes its own tokens over
them. For the same reason trimming the cache is free: the slot's length is where the next forward
starts, and nothing past it is ever read before it is written again. The first forward of a bucket
on a slot runs eagerly (on a side stream, as the warm-up CUDA graphs need; its logits are that
call's answer), then its graph is captured; later forwards of that bucket copy their ids, start
position and last token's index into the graph's input buffer and replay. A graph for ``forward``
computes the last real token's logits only; one for ``forward_all``, every padded position's.
Forwards longer than the largest bucket (prefills) run eagerly on the same cache.

A pass attends only a window of the cache, not all of it: attention costs what it reads, and a
short conversation in a 4,096-token cache would read 4,224 positions for every token. A graph's
window is the smallest power of two from 256 that holds the pass (at most the capacity): graphs
are captured per (bucket, window, last row only), at most twice the keys read. An eager pass reads exactly up
to its end. (Attending the whole cache, warm/cold TTFT was 0.33x instead of 0.24x.)

Each layer's ``cumulative_length`` (a device tensor in transformers' ``StaticLayer``, from which the
model derives positions and the attention mask) is set to ``start`` before every pass: inside the
graph from the input buffer, in eager passes with ``fill_``.

Only models whose every layer is full attention qualify (:func:`static_layout_problem`): a
sliding-window static layer is a ring buffer, which padding would overwrite.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

__all__ = ["BUCKETS", "GraphInputs", "StaticSlot", "WindowedLayer", "bucket_for", "static_layout_problem", "window_for"]

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Forward lengths a graph is captured for: a decode step (1), a speculative draft's verification
(up to 9), a warm turn's new message (20-60 tokens with its template markup), a short document."""
PAD_TOKEN = 0
"""Id fed at padded positions: any id does, their outputs are never read."""


def static_layout_problem(model: Any) -> str | None:
    """Why ``model`` cannot run on padded static-cache slots, or ``None`` when it can."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({str(kind) for kind in layer_types} - {"full_attention"})
    if other:
        return f"its layers include {', '.join(other)} (a static cache pads only full-attention layers)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it uses sliding-window attention (a static cache pads only full-attention layers)"
    try:
        probe = StaticCache(config=model.config, max_cache_len=1)
    except (TypeError, ValueError) as exc:
        return f"transformers cannot build a static cache for it ({exc})"
    kinds = {type(layer).__name__ for layer in getattr(probe, "layers", ()) if type(layer) is not StaticLayer}
    if kinds:
        return f"its static cache has {', '.join(sorted(kinds))} layers (only plain StaticLayer ones are padded)"
    if not all(hasattr(layer, "cumulative_length") for layer in probe.layers):
        return "this transformers version's StaticLayer keeps no cumulative_length (5.18 and later do)"
    return None


def window_for(end: int, capacity: int) -> int:
    """The positions a graph of a pass ending at ``end`` attends: a power of two from 256, or all."""
    window = 256
    while window < end:
        window *= 2
    return min(window, capacity)


class WindowedLayer(StaticLayer):  # type: ignore[no-untyped-call]  # transformers is untyped
    """A ``StaticLayer`` whose passes attend only its first ``window`` positions.

    ``window`` is set before every pass and must hold the pass's own positions; what lies past
    it is neither read nor written by that pass.
    """

    window: int

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window, 0


def bucket_for(n_tokens: int) -> int | None:
    """The smallest bucket that holds ``n_tokens``, or ``None`` past the largest."""
    for size in BUCKETS:
        if n_tokens <= size:
            return size
    return None


class GraphInputs:
    """What every slot's graphs share: the memory pool and one input buffer per bucket.

    A bucket's buffer holds ``b`` ids, the start position and the index of the last real token
    (the one row a pass for ``forward`` computes logits for), copied from pinned host memory in
    one transfer. Graphs of different slots read the same buffer: passes are serialized (the
    model's step lock), and each reads its logits back before the next pass is prepared.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capture = device.type == "cuda"
        """Whether graphs are captured; elsewhere padded passes run eagerly (tests on a CPU)."""
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._device_buffers: dict[int, torch.Tensor] = {}
        self._host_buffers: dict[int, torch.Tensor] = {}

    def load(self, size: int, tokens: Sequence[int], start: int) -> torch.Tensor:
        """Copy ``tokens`` (padded to ``size``), ``start`` and the last token's index into the bucket's
        device buffer."""
        host = self._host_buffers.get(size)
        if host is None:
            host = self._host_buffers[size] = torch.empty(size + 2, dtype=torch.long, pin_memory=self.capture)
            self._device_buffers[size] = torch.empty(size + 2, dtype=torch.long, device=self.device)
        n = len(tokens)
        host[:n] = torch.as_tensor(tokens, dtype=torch.long)
        host[n:size] = PAD_TOKEN
        host[size] = start
        host[size + 1] = n - 1
        buffer = self._device_buffers[size]
        # The host buffer is rewritten only after this pass's logits were read back (a sync).
        buffer.copy_(host, non_blocking=True)
        return buffer


def _padded_attention(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, the SDPA kernels for padded passes (a few queries against the whole cache).

    A padded pass attends all ``capacity`` keys under a mask, which flash attention does not
    take. On an H200 (one query, 4,224 keys, 32 heads over 8 KV heads, bfloat16) torch's
    memory-efficient kernel took 244 us per layer, the math kernel 193 and cuDNN's 62.5
    (``benchmarks/results/sdpa_static.txt``); the efficient kernel was 62% of a warm turn's GPU
    time, and the math kernel, which computes in float32, was slower still for 9 to 128 queries.
    cuDNN plans each new (query, key) shape, which eager passes of a growing conversation pay
    at every step (see ``_attention_kernels`` in the backend); a padded pass has one shape per
    bucket, planned in the eager pass that precedes its graph's capture. Where cuDNN declines a
    shape, torch takes the memory-efficient kernel.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


class StaticSlot:
    """One KV-cache slot: a static cache of ``capacity`` positions and its captured graphs.

    With ``inputs`` on a device other than CUDA, short passes are padded to their bucket and run
    eagerly, without graphs: how the padding is tested without a GPU.
    """

    def __init__(self, model: Any, cache_kwarg: str, capacity: int, inputs: GraphInputs) -> None:
        self._model = model
        self._cache_kwarg = cache_kwarg
        self._cache: Any = StaticCache(config=model.config, max_cache_len=capacity)
        self._layers = [WindowedLayer(max_cache_len=capacity) for _ in self._cache.layers]
        self._cache.layers = list(self._layers)
        self._inputs = inputs
        # keyed by (bucket, window, whether only the last real token's logits are computed)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capacity = capacity

    @property
    def graphs(self) -> int:
        """Graphs captured so far (one per bucket, window and row choice used)."""
        return len(self._graphs)

    def forward(self, tokens: Sequence[int], start: int, rows: int) -> torch.Tensor:
        """Logits of the last ``rows`` of ``tokens``, fed after the slot's first ``start`` positions.

        A tensor of shape ``(rows, vocabulary)`` on the model's device, valid until the next pass.
        """
        n = len(tokens)
        if not 1 <= rows <= n:
            raise ValueError(f"rows must be in 1..{n}, not {rows}")
        if start + n > self.capacity:
            raise ValueError(f"{start + n} positions do not fit a static cache of {self.capacity}")
        size = bucket_for(n) if self._initialized() else None
        if size is None or start + size > self.capacity:
            return self._eager(tokens, start, rows)
        inputs = self._inputs
        buffer = inputs.load(size, tokens, start)
        key = (size, window_for(start + size, self.capacity), rows == 1)
        captured = self._graphs.get(key)
        if captured is not None:
            graph, logits = captured
            graph.replay()
        elif inputs.capture:
            logits = self._capture(key, buffer)
        else:
            logits = self._padded_pass(key, buffer)
        return logits[0, -1:] if rows == 1 else logits[0, n - rows:n]

    def _initialized(self) -> bool:
        return all(getattr(layer, "is_initialized", False) for layer in self._layers)

    def _eager(self, tokens: Sequence[int], start: int, rows: int) -> torch.Tensor:
        for layer in self._layers:
            layer.cumulative_length.fill_(start)
            layer.window = start + len(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._model.device)
        output = self._model(input_ids=ids, use_cache=True, logits_to_keep=rows, **{self._cache_kwarg: self._cache})
        logits: torch.Tensor = output.logits[0, -rows:]
        return logits

    def _padded_pass(self, key: tuple[int, int, bool], buffer: torch.Tensor) -> torch.Tensor:
        """The pass a graph records: set every layer's length from the buffer, then the forward.

        Its logits are those of every padded position, or of the last real token alone (a
        ``forward``'s one row: the language-model head then runs on one position, and the graph
        keeps a vocabulary-sized output instead of ``size`` of them).
        """
        size, window, last_only = key
        start = buffer[size]
        for layer in self._layers:
            layer.cumulative_length.copy_(start)
            layer.window = window
        keep: torch.Tensor | int = buffer[size + 1:size + 2] if last_only else 0
        with _padded_attention(buffer.device):
            output = self._model(input_ids=buffer[:size].view(1, size), use_cache=True, logits_to_keep=keep,
                                 **{self._cache_kwarg: self._cache})  # fmt: skip
        logits: torch.Tensor = output.logits
        return logits

    def _capture(self, key: tuple[int, int, bool], buffer: torch.Tensor) -> torch.Tensor:
        """Run the bucket's pass eagerly on a side stream (the answer), then capture its graph."""
        inputs = self._inputs
        assert inputs.pool is not None  # graphs are captured only on CUDA
        side = torch.cuda.Stream(device=inputs.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            answer = self._padded_pass(key, buffer)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=inputs.pool, capture_error_mode="thread_local"):
            logits = self._padded_pass(key, buffer)
        self._graphs[key] = (graph, logits)
        logger.debug("captured a CUDA graph for %d-token passes within %d positions%s (%d on this slot)",
                     key[0], key[1], ", last row only" if key[2] else "", len(self._graphs))
        return answer

    def close(self) -> None:
        """Drop the graphs and the cache's tensors (the slot is unusable afterwards)."""
        self._graphs.clear()
        self._layers.clear()
        self._cache = None
