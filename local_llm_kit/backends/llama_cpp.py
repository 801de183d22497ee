"""The llama.cpp backend: a GGUF file through llama-cpp-python's low-level API.

Only evaluation is delegated to llama.cpp (``Llama.eval`` and the last position's logits);
sampling, constraints and stop handling stay in the shared decode loop, which runs at parity
with llama-cpp-python's own ``generate`` (see the README's benchmark table).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import llama_cpp._internals as llama_internals
import numpy as np

from local_llm_kit.backends import BackendOptions
from local_llm_kit.backends.base import Backend, ModelInfo, default_kv_slots, output_rows
from local_llm_kit.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    import llguidance

__all__ = ["LlamaCppBackend", "default_decode_threads", "default_threads", "gpu_options"]

logger = logging.getLogger(__name__)

_PLACEHOLDER_CTX = 64


def default_threads() -> int:
    """Physical cores, approximated as all visible cores up to 8 (more rarely helps decoding)."""
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        visible = os.cpu_count() or 1
    return max(1, min(visible, 8))


def default_decode_threads() -> int:
    """Threads of a one-token step when ``n_threads`` is not given: half of :func:`default_threads`.

    llama.cpp's workers meet at a barrier after every operation and spin while they wait, so when
    another process takes a core, the thread they wait for is descheduled and decoding collapses.
    A one-token step is too small to need every core. SmolLM2 on 2 cores (benchmarks/
    bench_wait_policy.py): 1 thread decoded at 131 tok/s, 2 threads at 133 on an idle machine but 41
    beside one busy process, where 1 thread kept 131. Prefill, a real matrix product, keeps every
    core (741 tokens: 1.77 s with 2 threads against 3.1 s with 1): ``n_threads_batch`` stays
    :func:`default_threads`.
    """
    return max(1, default_threads() // 2)


class LlamaCppBackend(Backend):
    """A GGUF model in one llama.cpp context whose KV cache holds ``n_slots`` sequences.

    Each slot is a llama.cpp sequence id in one context created with ``n_seq_max`` sequences
    and a non-unified KV cache (``kv_unified=False``): every sequence gets its own ``n_ctx``
    cells, and attention for one sequence reads only its own cells, so a slot costs memory but
    no speed (see the README's multi-slot benchmark). Gemma 3's sliding-window layers get a
    full-size cache per sequence (``swa_full``), so any prefix of any slot can be kept.
    """

    name = "llama.cpp"

    def __init__(self, path: str, options: BackendOptions) -> None:
        super().__init__()
        if options.cuda_graphs is not None:
            raise InvalidRequestError("cuda_graphs is a transformers option; llama.cpp offloads with n_gpu_layers=",
                                      param="cuda_graphs")
        if not Path(path).is_file():
            raise ModelLoadError(f"the llama.cpp backend loads GGUF files; {path} is not a file")
        threads = options.n_threads or default_decode_threads()
        batch_threads = options.n_threads or default_threads()
        gpu = gpu_options(options)
        try:
            # The Llama object holds the model, its tokenizer and metadata; its own context is a
            # small placeholder, replaced below by one with a sequence per slot (Llama cannot
            # create a context with several sequences).
            self._llama = llama_cpp.Llama(
                model_path=path, n_ctx=_PLACEHOLDER_CTX, n_threads=threads, n_threads_batch=batch_threads,
                logits_all=False, verbose=False, swa_full=True, **gpu,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc} (is it a complete GGUF file?)") from exc
        meta = self._llama.metadata
        kv_per_token = _kv_bytes_per_token(meta)
        n_slots = options.kv_slots or default_kv_slots(kv_per_token, options.n_ctx)
        self._allocate_slots(n_slots)
        self._n_batch = min(512, options.n_ctx)
        params = self._llama.context_params  # the placeholder's settings (threads, flash attention...)
        params.n_ctx = options.n_ctx * n_slots
        params.n_batch = params.n_ubatch = self._n_batch
        params.n_seq_max = n_slots
        params.kv_unified = False
        params.swa_full = True  # a full-size sliding-window cache can be trimmed to any prefix
        try:
            context = llama_internals.LlamaContext(model=self._llama._model, params=params, verbose=False)
        except ValueError as exc:
            self._llama.close()
            raise ModelLoadError(f"llama.cpp could not create a context of {n_slots} x {options.n_ctx} tokens "
                                 f"for {path}: {exc} (lower kv_slots or context_length)") from exc
        self._llama._ctx.close()  # type: ignore[no-untyped-call]  # the placeholder
        self._llama._ctx = context
        self._ctx = context.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_internals.LlamaBatch(n_tokens=self._n_batch, embd=0, n_seq_max=1, verbose=False)
        # llama.cpp may round the context up; the requested size is the one users asked for.
        self._n_ctx = min(options.n_ctx, int(llama_cpp.llama_n_ctx_seq(self._ctx)))
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama._model.model)
        self._n_vocab = self._llama.n_vocab()
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._llg: llguidance.LLTokenizer | None = None
        self.kv_bytes_per_token = kv_per_token
        self._info = self._read_info(path, {
            "kv_slots": str(n_slots), "n_gpu_layers": str(gpu.get("n_gpu_layers", 0)),
            "gpu_offload": str(bool(llama_cpp.llama_supports_gpu_offload())).lower(),
            "flash_attn": str(bool(gpu.get("flash_attn", False))).lower(),
        })
        if gpu:
            logger.info("llama.cpp GPU options for %s: %s", Path(path).name, gpu)

    def _read_info(self, path: str, extra: dict[str, str]) -> ModelInfo:
        meta = self._llama.metadata
        architecture = meta.get("general.architecture", "unknown")
        eog = {t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return ModelInfo(
            path=path,
            architecture=architecture,
            n_vocab=self._n_vocab,
            n_ctx_train=int(meta.get(f"{architecture}.context_length", self._n_ctx)),
            eos_token_ids=frozenset(eog | ({eos} if eos >= 0 else set())),
            bos_token=self.token_bytes(bos).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos).decode("utf-8", "replace") if eos >= 0 else "",
            bos_token_id=bos if bos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template"),
            extra={"name": meta.get("general.name", ""), **extra},
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        # Llama.tokenize allocates room for a whole training context on every call (0.2 ms at
        # 8k, 1 ms at 32k): a warm turn's few new tokens need a buffer of their own size. A
        # token covers at least one byte of the text.
        data = text.encode("utf-8")
        size = len(data) + 1
        buffer = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, size, False, True)
        if n < 0:  # never for these arguments; llama.cpp reports the room it needs
            buffer = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, -n, False, True)
            if n < 0:
                raise RuntimeError(f"llama.cpp failed to tokenize {len(data)} bytes ({n})")
        return buffer[:n]

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            buf = self._piece_buffer
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: llama.cpp reports the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
            piece = self._pieces[token_id] = buf.raw[:n]
        return piece

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        # What llguidance.llamacpp.lltokenizer_from_vocab builds, with llama_vocab_get_attr: the
        # llama_token_get_attr it calls is deprecated in llama-cpp-python, which warns once per
        # vocabulary entry (262k DeprecationWarnings for Gemma). No warning filter: those are global.
        if self._llg is None:
            import llguidance

            buffer = ctypes.create_string_buffer(16 * 1024)  # a local one: token_bytes may run meanwhile
            tokens: list[bytes] = []
            for token in range(llama_cpp.llama_vocab_n_tokens(self._vocab)):
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
                if n < 0:
                    raise ModelLoadError(f"token {token} of {self._info.path} is longer than {len(buffer)} bytes")
                piece = buffer.raw[:n]
                attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
                # Control tokens, and user-defined ones that look like them, are special to llguidance.
                if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (
                        attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece[:1] == b"<" and piece[-1:] == b">"):
                    piece = b"\xff" + piece
                tokens.append(piece)
            tokens += [b""] * (self._n_vocab - len(tokens))
            self._llg = llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
                tokens=tokens, vocab_ptr=self._vocab, eos_token=sorted(self._info.eos_token_ids),
                tokenize_fptr=ctypes.cast(llama_cpp.llama_tokenize, ctypes.c_void_p).value)
        return self._llg

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self._decode(tokens, rows=None)
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        # A view of llama.cpp's own buffer, not a copy (1 MB per token for a 262k vocabulary):
        # the decode loop is done with it, masking in place included, before the next forward.
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        wanted = output_rows(tokens, rows)
        self._decode(tokens, rows=wanted)  # one batch: the wanted positions' outputs, in order
        pointer = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(len(wanted), self._n_vocab)).copy()  # rows outlive the next decode

    def _decode(self, tokens: Sequence[int], *, rows: Sequence[int] | None) -> None:
        """Evaluate ``tokens`` in batches, computing logits at the positions ``rows`` (in one batch),
        or only at the last position of each batch (None)."""
        if not tokens:
            raise ValueError("forward needs at least one token")
        if rows is not None and len(tokens) > self._n_batch:  # earlier batches' logits would be gone
            raise ValueError(f"forward_all evaluates at most {self._n_batch} tokens at once, not {len(tokens)}")
        cached = self._cached
        n_past = len(cached)
        if n_past + len(tokens) > self.n_ctx:
            raise ValueError(f"{n_past + len(tokens)} tokens exceed the context of {self.n_ctx}")
        seq = self._slot
        batch = self._batch.batch
        try:
            for start in range(0, len(tokens), self._n_batch):
                chunk = tokens[start:start + self._n_batch]
                n = len(chunk)
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = n_past + i
                    batch.seq_id[i][0] = seq
                    batch.n_seq_id[i] = 1
                    batch.logits[i] = False
                for i in [n - 1] if rows is None else rows:
                    batch.logits[i] = True
                batch.n_tokens = n
                rc = llama_cpp.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                cached.extend(chunk)
                n_past += n
        except BaseException:
            # A failed decode leaves this sequence's cache in an unknown state: forget it entirely.
            # BaseException too: Ctrl-C during llama_decode surfaces right after it returns, when
            # the KV cache holds the batch but the backend has not recorded it.
            self._reset_cache()
            raise

    def _reset_cache(self) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, self._slot, 0, -1)
        self._cached.clear()

    def truncate_cache(self, n_keep: int) -> int:
        n_keep = max(0, min(n_keep, len(self._cached)))
        if n_keep == len(self._cached):
            return n_keep
        if not llama_cpp.llama_memory_seq_rm(self._memory, self._slot, n_keep, -1):
            logger.debug("llama.cpp could not trim slot %d to %d tokens; clearing it", self._slot, n_keep)
            llama_cpp.llama_memory_seq_rm(self._memory, self._slot, 0, -1)
            n_keep = 0
        del self._cached[n_keep:]
        return n_keep

    def close(self) -> None:
        # The engine's lease guarantees no step or tokenization runs now, nor will after this.
        for tokens in self._slot_tokens:
            tokens.clear()
        with contextlib.suppress(Exception):
            self._batch.close()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            self._llama.close()


def gpu_options(options: BackendOptions) -> dict[str, Any]:
    """``Llama(...)`` keyword arguments for the GPU options, checked against this build of llama.cpp.

    A request for GPU offload from a build without GPU support raises instead of running on the
    CPU unnoticed (llama.cpp itself would just ignore it).
    """
    kwargs: dict[str, Any] = {}
    if options.n_gpu_layers is not None:
        kwargs["n_gpu_layers"] = options.n_gpu_layers
    if options.main_gpu is not None:
        kwargs["main_gpu"] = options.main_gpu
    if options.tensor_split is not None:
        kwargs["tensor_split"] = list(options.tensor_split)
    if options.flash_attn is not None:
        kwargs["flash_attn"] = options.flash_attn
    asked = [name for name in ("n_gpu_layers", "main_gpu", "tensor_split")
             if name in kwargs and kwargs[name] not in (0, None)]
    if asked and not llama_cpp.llama_supports_gpu_offload():
        raise InvalidRequestError(
            f"{asked[0]}={kwargs[asked[0]]!r} asks for GPU offload, but the installed llama-cpp-python was "
            "built for the CPU only; reinstall it with GPU support, e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" pip "
            "install --no-cache-dir --force-reinstall llama-cpp-python (-DGGML_METAL=on on macOS), or "
            f"leave {asked[0]} unset", param=asked[0])
    devices = int(llama_cpp.llama_max_devices())
    if options.tensor_split is not None and len(options.tensor_split) > devices:
        raise InvalidRequestError(f"tensor_split has {len(options.tensor_split)} entries; this build of "
                                  f"llama.cpp supports at most {devices} devices", param="tensor_split")
    if options.main_gpu is not None and options.main_gpu >= devices:
        raise InvalidRequestError(f"main_gpu={options.main_gpu} is not a device of this build of llama.cpp "
                                  f"(at most {devices})", param="main_gpu")
    return kwargs


def _kv_bytes_per_token(meta: dict[str, str]) -> int | None:
    """Bytes of f16 keys and values per cached token, from the GGUF metadata (None if unknown)."""
    arch = meta.get("general.architecture", "")
    try:
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        embd = int(meta[f"{arch}.embedding_length"])
        key = int(meta.get(f"{arch}.attention.key_length", embd // heads))
        value = int(meta.get(f"{arch}.attention.value_length", embd // heads))
    except (KeyError, ValueError, ZeroDivisionError):  # per-layer arrays, unknown layouts
        return None
    return layers * kv_heads * (key + value) * 2
