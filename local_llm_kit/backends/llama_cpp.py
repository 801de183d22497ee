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
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from local_llm_kit.backends import BackendOptions
from local_llm_kit.backends.base import Backend, ModelInfo
from local_llm_kit.errors import ModelLoadError

if TYPE_CHECKING:
    import llguidance

__all__ = ["LlamaCppBackend", "default_threads"]

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """Physical cores, approximated as all visible cores up to 8 (more rarely helps decoding)."""
    try:
        visible = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        visible = os.cpu_count() or 1
    return max(1, min(visible, 8))


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(self, path: str, options: BackendOptions) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise ModelLoadError(f"the llama.cpp backend loads GGUF files; {path} is not a file")
        threads = options.n_threads or default_threads()
        try:
            self._llama = llama_cpp.Llama(
                model_path=path, n_ctx=options.n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=min(512, options.n_ctx), logits_all=False, verbose=False,
                # A full-size sliding-window cache can be trimmed to any prefix, which KV reuse needs.
                swa_full=True,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc} (is it a complete GGUF file?)") from exc
        # llama.cpp may round the context up; the requested size is the one users asked for.
        self._n_ctx = min(options.n_ctx, int(self._llama.n_ctx()))
        self._ctx = self._llama._ctx.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama._model.model)
        self._n_vocab = self._llama.n_vocab()
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._llg: llguidance.LLTokenizer | None = None
        self._info = self._read_info(path)

    def _read_info(self, path: str) -> ModelInfo:
        meta = self._llama.metadata
        architecture = meta.get("general.architecture", "unknown")
        eog = {t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return ModelInfo(
            path=path,
            architecture=architecture,
            n_vocab=self._n_vocab,
            n_ctx_train=int(meta.get(f"{architecture}.context_length", self._llama.n_ctx())),
            eos_token_ids=frozenset(eog | ({eos} if eos >= 0 else set())),
            bos_token=self.token_bytes(bos).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos).decode("utf-8", "replace") if eos >= 0 else "",
            bos_token_id=bos if bos >= 0 else None,
            chat_template=meta.get("tokenizer.chat_template"),
            extra={"name": meta.get("general.name", "")},
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

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
        if self._llg is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            self._llg = lltokenizer_from_vocab(self._vocab, n_vocab=self._n_vocab,
                                               eos_token=sorted(self._info.eos_token_ids))
        return self._llg

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        if not tokens:
            raise ValueError("forward needs at least one token")
        n_before = self._llama.n_tokens
        if n_before + len(tokens) > self.n_ctx:
            raise ValueError(f"{n_before + len(tokens)} tokens exceed the context of {self.n_ctx}")
        try:
            self._llama.eval(list(tokens))
        except BaseException:
            # A failed decode leaves the cache in an unknown state (Llama.eval may already have
            # advanced n_tokens past the batches it decoded): forget it entirely. BaseException
            # too: Ctrl-C during a decode surfaces right after it returns, when the KV cache holds
            # the batch but the backend has not recorded it.
            self._reset_cache()
            raise
        self._cached.extend(tokens)
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        # A view of llama.cpp's own buffer, not a copy (1 MB per token for a 262k vocabulary):
        # the decode loop is done with it, masking in place included, before the next forward.
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _reset_cache(self) -> None:
        self._llama._ctx.kv_cache_seq_rm(-1, 0, -1)
        self._llama.n_tokens = 0
        self._cached.clear()

    def truncate_cache(self, n_keep: int) -> int:
        n_keep = max(0, min(n_keep, len(self._cached)))
        if n_keep == len(self._cached):
            return n_keep
        if not self._llama._ctx.kv_cache_seq_rm(-1, n_keep, -1):
            logger.debug("llama.cpp could not trim its cache to %d tokens; clearing it", n_keep)
            self._llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            n_keep = 0
        self._llama.n_tokens = n_keep
        del self._cached[n_keep:]
        return n_keep

    def close(self) -> None:
        # The engine's lease guarantees no step or tokenization runs now, nor will after this.
        self._cached.clear()
        with contextlib.suppress(Exception):
            self._llama.close()
