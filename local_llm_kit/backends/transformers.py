"""The transformers/torch backend: a Hugging Face causal LM behind the Backend contract.

It loads either a Hugging Face model folder (``config.json``, safetensors, tokenizer files) or a
GGUF file, which is converted once into a cached Hugging Face folder (see
:mod:`local_llm_kit.backends._hf_convert`) so both backends can serve the same file. Nothing is
ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``.

Each KV-cache slot (see :mod:`local_llm_kit.slots`) is one :class:`transformers.DynamicCache`
kept across calls; ``forward`` feeds only the new tokens and asks for the last position's
logits only (``logits_to_keep=1``), so a prefix shared with the previous request is never
recomputed and prefill does not materialize a
``prompt_length x vocabulary`` matrix (1 GB for a 1000-token Gemma prompt in float32).

This module imports torch and transformers at its top: it is only imported when the backend is
chosen (see :func:`local_llm_kit.backends.create_backend`).

OpenMP wait policy. Before it imports torch for the first time, this module sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment already says otherwise. With the default
policy torch's OpenMP threads spin at every barrier, and as soon as another process wants one of
the cores the decode rate collapses. SmolLM2, bfloat16, 2 threads on a 2-core machine, tokens/s:

    ================================  ==========  ==========
    policy                            quiet       1 busy core
    ================================  ==========  ==========
    default (spin)                    25.6-28.6   0.4-5.9
    PASSIVE                           17.4-19.0   14.0-17.2
    ================================  ==========  ==========

(``model.generate`` collapses alike: 17 -> 0.5 tokens/s.) A third of the peak on an idle machine
is traded for never losing 3-40x on a shared one, which is where a library runs. Set
``OMP_WAIT_POLICY=ACTIVE`` in the environment for the peak on a dedicated machine. libgomp reads
the variable once, when it is loaded, so this has no effect when torch (or llama.cpp, which
loads the same libgomp) was imported first.
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import inspect  # after the OpenMP policy above: it must precede torch
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from local_llm_kit.backends import BackendOptions
from local_llm_kit.backends._cuda_graphs import BUCKETS, GraphInputs, StaticSlot, static_layout_problem
from local_llm_kit.backends._hf_convert import cached_hf_folder, is_gguf_file
from local_llm_kit.backends.base import Backend, ModelInfo, default_kv_slots, output_rows
from local_llm_kit.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    TokenLimitError,
)

if TYPE_CHECKING:
    import llguidance

__all__ = ["TransformersBackend"]

logger = logging.getLogger(__name__)

# Token texts that end a turn, the list llama.cpp uses to build its end-of-generation set, so that
# both backends stop on the same tokens (llama.cpp also stops on fill-in-the-middle markers).
END_OF_TURN_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "</s>",
)  # fmt: skip
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, Arm "Features"


class TransformersBackend(Backend):
    """A Hugging Face causal LM with one KV cache, evaluated token by token.

    Defaults when ``options`` leave them open:

    * ``device``: cuda, else mps, else cpu.
    * ``dtype``: on cpu, bfloat16 where the CPU has bfloat16 arithmetic (see
      :func:`_cpu_has_native_bf16`), else float32; on cuda bfloat16 where supported, else
      float16; on mps float16. On SmolLM2 here (AVX512-BF16, 2 threads) bfloat16 halved the
      time to first token (63 against 121-159 ms idle, 112 against 211 ms shared) and decoded
      at least as fast (idle: 26-29 against 15-18 tokens/s with the spinning OpenMP policy,
      17-19 against 16-17 with PASSIVE), with the same answer to the integration tests'
      question (benchmarks/bench_transformers.py has the side-by-side figures).
    * ``n_threads``: the physical cores this process may run on. ``torch.set_num_threads`` is
      process-wide, so the last backend loaded sets it for all.
    * ``cuda_graphs``: on where the device is CUDA and every layer is full attention (see
      :mod:`local_llm_kit.backends._cuda_graphs`); ``True`` elsewhere raises.

    ``static_cache=True`` (tests only) puts the slots on the CUDA-graph path's padded static caches
    on any device; off CUDA their passes run eagerly, so that the padding is checked without a GPU.
    """

    name = "transformers"

    def __init__(self, path: str, options: BackendOptions, *, static_cache: bool = False) -> None:
        super().__init__()
        for name in ("n_gpu_layers", "flash_attn", "main_gpu", "tensor_split"):
            if getattr(options, name) is not None:
                raise InvalidRequestError(
                    f"{name} is a llama.cpp option; the transformers backend places the model with "
                    "device= (e.g. device='cuda')", param=name)
        self._options = options
        self._source = Path(path).expanduser()
        self._device = _pick_device(options.device)
        self._dtype = _pick_dtype(options.dtype, self._device)
        torch.set_num_threads(_pick_threads(options.n_threads))
        self._tokenizer, self._model, folder = self._load()
        self._model.eval()
        params = inspect.signature(self._model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache``; 4.x only knows the old name.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params  # transformers < 4.45 computes every position
        n_slots = options.kv_slots or default_kv_slots(self.kv_bytes_per_token, options.n_ctx)
        self._allocate_slots(n_slots)
        graphs = _pick_cuda_graphs(options.cuda_graphs, self._device, self._model)
        self._static: list[StaticSlot] | None = None
        self._caches: list[Any] = []
        if graphs or static_cache:
            if static_cache and (problem := static_layout_problem(self._model)):
                raise InvalidRequestError(f"static_cache=True cannot be used: {problem}", param="static_cache")
            inputs = GraphInputs(self._device)
            capacity = options.n_ctx + max(BUCKETS)  # a padded pass may write past n_ctx
            self._static = [StaticSlot(self._model, self._cache_kwarg, capacity, inputs) for _ in range(n_slots)]
        else:
            self._caches = [self._new_cache() for _ in range(n_slots)]
        extra = {"device": str(self._device), "dtype": str(self._dtype).removeprefix("torch."),
                 "folder": str(folder), "transformers": transformers.__version__,
                 "kv_slots": str(n_slots), "cuda_graphs": "on" if graphs else "off"}  # fmt: skip
        self._info = _model_info(self._source, self._tokenizer, self._model, extra)
        if options.n_ctx > self._info.n_ctx_train:
            logger.warning(
                "n_ctx=%d exceeds the %d tokens %s was trained with; quality may degrade past that",
                options.n_ctx, self._info.n_ctx_train, self._source.name,
            )  # fmt: skip
        self._token_bytes: list[bytes] | None = None
        self._llg: llguidance.LLTokenizer | None = None

    # -- loading ----------------------------------------------------------------------------------
    def _load(self) -> tuple[Any, Any, Path]:
        """Load tokenizer and model from the folder the source resolves to.

        A converted GGUF entry that fails to load (its files damaged after it was completed)
        is removed and converted again, once.
        """
        source = self._source
        if not source.exists():
            raise ModelNotFoundError(f"no model at {source}", searched=[str(source)])
        if source.is_dir():
            if not (source / "config.json").is_file():
                raise ModelLoadError(f"{source} is a folder without config.json, not a Hugging Face model")
            return (*self._load_folder(source), source)
        if not is_gguf_file(source):
            raise ModelLoadError(
                f"{source} is neither a GGUF file nor a Hugging Face model folder "
                "(the transformers backend loads those two)"
            )
        cache_root = self._options.cache_dir
        folder = cached_hf_folder(source, cache_root)
        try:
            return (*self._load_folder(folder), folder)
        except ModelLoadError as exc:
            logger.warning("converted model %s does not load (%s); converting again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            folder = cached_hf_folder(source, cache_root)
            return (*self._load_folder(folder), folder)

    def _load_folder(self, folder: Path) -> tuple[Any, Any]:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=self._dtype, local_files_only=True
            )
        except MemoryError:
            raise
        except Exception as exc:  # transformers raises many types, some odd (SafetensorError)
            # Only errors of the files: a cancellation or an interrupt (BaseException) is not a
            # damaged entry, and must not get the conversion cache deleted by the caller.
            raise ModelLoadError(f"transformers could not load {folder}: {exc}") from exc
        return tokenizer, model.to(self._device)

    def _new_cache(self) -> Any:
        """An empty cache laid out for the model (sliding-window layers where it has them).

        Sliding-window layers are told to keep their full history (``activate_past_recording``):
        by default they drop keys older than the window, after which no crop can restore an
        earlier state and every multi-turn request past the window would be re-evaluated whole.
        Keeping them costs as much memory as a full-attention layer; attention still only reads
        the window.
        """
        cache: Any
        try:
            cache = DynamicCache(config=self._model.config)
        except TypeError:  # transformers < 4.56 builds the layout lazily
            cache = DynamicCache()
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        return cache

    @property
    def _cache(self) -> Any:
        """The current slot's cache."""
        return self._caches[self._slot]

    @_cache.setter
    def _cache(self, cache: Any) -> None:
        self._caches[self._slot] = cache

    @property
    def kv_bytes_per_token(self) -> int | None:
        """Bytes of keys and values one cached token takes (sliding-window layers keep full history)."""
        config = self._model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            layers = int(config.num_hidden_layers)
            heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
            head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        except (AttributeError, TypeError, ValueError):
            return None
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return layers * heads * head_dim * 2 * itemsize

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The loaded ``PreTrainedModel`` (for benchmarks and power users; do not move it)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (``apply_chat_template``, ``decode``...)."""
        return self._tokenizer

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_ctx(self) -> int:
        return self._options.n_ctx

    # -- text <-> tokens --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if self._token_bytes is None:
            self._token_bytes = _token_bytes_table(self._tokenizer, self._info.n_vocab)
        return self._token_bytes[token_id]

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self._info.n_vocab, eos_token=sorted(self._info.eos_token_ids)
            )
        return self._llg

    # -- evaluation -------------------------------------------------------------------------------
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self._evaluate(tokens, 1)
        return np.asarray(logits[-1].to(device="cpu", dtype=torch.float32).numpy())

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        wanted = output_rows(tokens, rows)
        first = wanted[0]
        logits = self._evaluate(tokens, len(tokens) - first)  # the positions from the first one wanted
        if len(wanted) < len(tokens) - first:
            logits = logits[[i - first for i in wanted]]
        return np.asarray(logits.to(device="cpu", dtype=torch.float32).numpy())

    def _evaluate(self, tokens: Sequence[int], rows: int) -> Any:
        """Feed ``tokens`` after the cached ones; the logits of their last ``rows`` positions."""
        if len(tokens) == 0:
            raise InvalidRequestError("forward needs at least one token", param="tokens")
        total = len(self._cached) + len(tokens)
        if total > self.n_ctx:
            raise TokenLimitError(
                f"{total} tokens do not fit the context of {self.n_ctx}",
                prompt_tokens=total, max_tokens=None, context_length=self.n_ctx,
            )  # fmt: skip
        try:
            with torch.inference_mode(), _attention_kernels(self._device):
                if self._static is not None:
                    logits = self._static[self._slot].forward(tokens, len(self._cached), rows)
                else:
                    input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
                    keep = {"logits_to_keep": rows} if self._keeps_logits else {}
                    output = self._model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: self._cache},
                                         **keep)  # fmt: skip
                    logits = output.logits[0, -rows:]
        except BaseException:
            # Some layers may hold the new tokens and others not: only an empty cache is sure.
            self._reset_cache()
            raise
        self._cached.extend(tokens)
        return logits

    def truncate_cache(self, n_keep: int) -> int:
        """Crop the cache to ``n_keep`` tokens where that is exact, else empty it.

        Full-attention layers crop exactly. A sliding-window layer of window ``w`` that holds the
        keys of positions ``[floor, length)`` can be cropped to ``n`` exactly when it still holds
        every key that position ``n`` would attend to: ``floor == 0`` or ``n - w + 1 >= floor``.
        Otherwise the cache is emptied and 0 returned; the decode loop re-evaluates the prefix.
        """
        length = len(self._cached)
        n_keep = max(0, min(n_keep, length))
        if n_keep == length:
            return n_keep
        if self._static is not None:  # exact: the next pass starts at n_keep and writes over the rest
            del self._cached[n_keep:]
            return n_keep
        if n_keep == 0 or not self._can_crop_to(n_keep):
            logger.debug("cache cannot be cropped to %d of %d tokens; emptying it", n_keep, length)
            self._reset_cache()
            return 0
        with torch.inference_mode():  # the cached tensors are inference tensors
            self._cache.crop(n_keep - length)  # negative: tokens to remove (both 4.x and 5.x)
        del self._cached[n_keep:]
        return n_keep

    def _can_crop_to(self, n_keep: int) -> bool:
        layers = getattr(self._cache, "layers", None)
        if layers is None:  # transformers 4.x DynamicCache: full attention only
            return True
        for layer in layers:
            if not getattr(layer, "is_initialized", True):
                continue
            if getattr(layer, "is_sliding", False):
                try:
                    window = int(layer.sliding_window)
                    floor = int(layer.cumulative_length) - int(layer.keys.shape[-2])
                except (AttributeError, TypeError):
                    return False
                if floor > 0 and n_keep - window + 1 < floor:
                    return False
            elif not isinstance(layer, transformers.cache_utils.DynamicLayer):
                return False  # an unknown layer kind (linear attention...): do not guess
        return True

    def _reset_cache(self) -> None:
        if self._static is None:  # a static slot is reset by its length alone (see truncate_cache)
            self._cache = self._new_cache()
        self._cached.clear()

    @property
    def cuda_graphs(self) -> int:
        """CUDA graphs captured so far over all slots (0 where graphs are off)."""
        return sum(slot.graphs for slot in self._static or ())

    def close(self) -> None:
        for slot in self._static or ():
            slot.close()
        self._caches = [None] * self.n_slots
        for tokens in self._slot_tokens:
            tokens.clear()
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


# -- helpers ------------------------------------------------------------------------------------------


def _attention_kernels(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The scaled-dot-product attention kernels a forward pass may use on ``device``.

    On CUDA, every kernel torch has but cuDNN's: torch 2.11 picks cuDNN attention on Hopper GPUs,
    and cuDNN builds a new execution plan for each (query length, key length) pair it has not
    seen. In a conversation every decode step and every turn is a new pair: on an H200 a 1B Llama
    decoded at 15 tok/s with it and 91 tok/s without, and a 23-token forward at a new length took
    82 ms instead of 13 (benchmarks/results/gpu.novel.md). The choice is torch's process-wide setting
    for the pass's duration. Elsewhere torch's own choice stands. Padded CUDA-graph passes choose
    again inside this (cuDNN first: their shapes never change; see ``_cuda_graphs``).
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _pick_cuda_graphs(requested: bool | None, device: torch.device, model: Any) -> bool:
    """Whether short passes replay as CUDA graphs: ``requested``, or where they can when ``None``."""
    if requested is False:
        return False
    problem = None if device.type == "cuda" else f"the model is on {device.type}; CUDA graphs need device='cuda'"
    problem = problem or static_layout_problem(model)
    if problem is not None:
        if requested:
            raise InvalidRequestError(f"cuda_graphs=True cannot be used: {problem}", param="cuda_graphs")
        if device.type == "cuda":
            logger.info("CUDA graphs are off for this model: %s", problem)
        return False
    return True


def _pick_device(name: str | None) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"unknown torch device {name!r}: {exc}", param="device") from exc


def _pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidRequestError(
            f"dtype must name a torch floating-point type (float32, bfloat16, float16), not {name!r}",
            param="dtype",
        )
    return dtype


def _cpu_has_native_bf16() -> bool:
    """Whether the CPU does bfloat16 arithmetic in hardware (AVX512-BF16, AMX, Arm BF16).

    Measured here (AMD EPYC with AVX512-BF16, one thread): a 576x49152 projection of 256 rows
    took 74 ms in bfloat16 against 207 ms in float32; restricted to AVX2 (``ATEN_CPU_CAPABILITY
    =avx2 ONEDNN_MAX_CPU_ISA=AVX2``) the bfloat16 one took 804 ms. Emulated bfloat16 would make
    prefill several times slower, so it is only the default where the hardware has it. Where
    this cannot be told (no ``/proc/cpuinfo``: macOS, Windows) float32 is the safe choice.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return not _NATIVE_BF16_FLAGS.isdisjoint(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return False


def _pick_threads(n_threads: int | None) -> int:
    """``n_threads`` or the physical cores this process may use (hyperthreads slow matmuls)."""
    if n_threads is not None:
        if n_threads < 1:
            raise InvalidRequestError(f"n_threads must be at least 1, not {n_threads}", param="n_threads")
        return n_threads
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    logical = os.cpu_count() or allowed
    try:
        import psutil  # type: ignore[import-untyped]

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    # Scale the affinity set by the machine's physical/logical ratio (2 on hyperthreaded x86).
    return max(1, min(allowed, round(allowed * physical / logical)))


def _model_info(source: Path, tokenizer: Any, model: Any, extra: dict[str, str]) -> ModelInfo:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    output = model.get_output_embeddings()
    n_vocab = int(output.weight.shape[0]) if output is not None else int(config.vocab_size)
    vocab: dict[str, int] = tokenizer.get_vocab()
    eos: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), config.eos_token_id,
                  tokenizer.eos_token_id):  # fmt: skip
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    eos.update(vocab[text] for text in END_OF_TURN_TEXTS if text in vocab)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one is the chat template
        template = template.get("default")
    return ModelInfo(
        path=str(source),
        architecture=str(config.model_type),
        n_vocab=n_vocab,
        n_ctx_train=int(getattr(config, "max_position_embeddings", 0) or 0),
        eos_token_ids=frozenset(i for i in eos if 0 <= i < n_vocab),
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        bos_token_id=tokenizer.bos_token_id,
        chat_template=template or None,
        extra=extra,
    )


def _token_bytes_table(tokenizer: Any, n_vocab: int) -> list[bytes]:
    """The bytes of every token id, as llama.cpp's ``token_to_piece`` gives them.

    Vocabulary pieces are mapped back through the tokenizer's decoder: byte-level BPE (GPT-2,
    SmolLM2) through the inverse of its bytes-to-unicode table; sentencepiece-style vocabularies
    (Gemma, Llama 2) by turning ``▁`` into a space and byte-fallback pieces ``<0xNN>`` into the
    byte. Added tokens (special or not) stand for their own text. A decoder's ``Strip`` of the
    first leading space is not applied: it concerns the start of a text, not a token.
    Ids past the tokenizer's vocabulary (padded output rows) stand for nothing.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoders = _flatten_decoders(spec.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    replacements = [
        (d["pattern"]["String"], d["content"])
        for d in decoders
        if d.get("type") == "Replace" and "String" in (d.get("pattern") or {})
    ]
    replacements += [(d.get("replacement", "▁"), " ") for d in decoders if d.get("type") == "Metaspace"]
    byte_decoder = _byte_decoder() if "ByteLevel" in kinds else None
    byte_fallback = "ByteFallback" in kinds

    def piece_bytes(piece: str) -> bytes:
        if byte_decoder is not None:
            return b"".join(byte_decoder.get(c) or c.encode("utf-8") for c in piece)
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        for old, new in replacements:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")

    table = [b""] * n_vocab
    for piece, token_id in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        if 0 <= token_id < n_vocab:
            table[token_id] = piece_bytes(piece)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if 0 <= token_id < n_vocab:
            table[token_id] = str(added.content).encode("utf-8")
    return table


def _flatten_decoders(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _flatten_decoders(sub)]
    return [decoder]


def _byte_decoder() -> dict[str, bytes]:
    """Inverse of GPT-2's bytes-to-unicode table: printable stand-in character -> its byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): bytes([b]) for b, c in zip(printable, chars, strict=True)}
