"""Client settings, resolved as: explicit argument > ``LOCAL_LLM_KIT_*`` environment > default.

=================================  ===================================================
``LOCAL_LLM_KIT_MODEL_PATH``       default model file or folder, or a folder searched for
                                   model files named by ``LLMClient(model=...)``
``LOCAL_LLM_KIT_BACKEND``          ``llama.cpp`` (default), ``transformers`` or ``openai``
                                   (an OpenAI-compatible server at ``base_url``)
``LOCAL_LLM_KIT_CONTEXT_LENGTH``   context window in tokens (default 2048)
``LOCAL_LLM_KIT_CACHE_DIR``        converted models and assembled packaged models
                                   (default ``~/.cache/local_llm_kit``)
``LOCAL_LLM_KIT_BASE_URL``         the server ``backend="openai"`` talks to
                                   (e.g. ``http://127.0.0.1:8000/v1``)
``LOCAL_LLM_KIT_API_KEY``          the key sent to that server, and the key
                                   ``local-llm-kit serve`` requires
``LOCAL_LLM_KIT_N_GPU_LAYERS``     llama.cpp: layers to offload to the GPU (-1: all)
``LOCAL_LLM_KIT_KV_SLOTS``         cached conversations kept per loaded model
``LOCAL_LLM_KIT_N_THREADS``        CPU threads of an in-process engine (fewer where other
                                 processes compete for the cores: see the README)
                                   (default: chosen from the model's KV size)
=================================  ===================================================

Load options of the in-process backends (arguments of ``LLMClient``; part of the key under
which clients share a loaded model):

* both: ``kv_slots`` (see :func:`check_kv_slots`);
* llama.cpp only: ``n_gpu_layers``, ``flash_attn``, ``main_gpu``, ``tensor_split``. Passing one
  to another backend raises; passing a GPU option to a llama-cpp-python built without GPU
  support raises when the model loads (see :mod:`local_llm_kit.backends.llama_cpp`).
* transformers only: ``cuda_graphs`` (see :mod:`local_llm_kit.backends._cuda_graphs`); ``True``
  raises when the model loads where graphs cannot run (not on CUDA, sliding-window layers).

A malformed environment value raises :class:`~local_llm_kit.errors.InvalidRequestError`
naming the variable, rather than being ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.speculation import draft_tokens

__all__ = ["DEFAULT_BACKEND", "DEFAULT_CONTEXT_LENGTH", "DEFAULT_MODEL", "Settings", "resolve_settings"]

ENV_PREFIX = "LOCAL_LLM_KIT_"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_BACKEND = "llama.cpp"
DEFAULT_CONTEXT_LENGTH = 2048
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_PROMPT_LOOKUP = 0
"""Speculation is off unless asked for: see the README's "Speculative decoding" for when it pays."""
REMOTE_BACKEND = "openai"
KNOWN_BACKENDS = ("llama.cpp", "transformers", REMOTE_BACKEND)
_BACKEND_SPELLINGS = {"llama.cpp": "llama.cpp", "llama_cpp": "llama.cpp", "llamacpp": "llama.cpp",
                      "llama-cpp": "llama.cpp", "transformers": "transformers", "hf": "transformers",
                      "openai": REMOTE_BACKEND, "openai-compatible": REMOTE_BACKEND}


@dataclass(frozen=True)
class Settings:
    """The fully resolved settings of one client."""

    model: str
    model_path: str | None
    backend: str
    context_length: int
    temperature: float
    top_p: float
    cache_dir: Path
    n_threads: int | None = None
    dtype: str | None = None
    device: str | None = None
    base_url: str | None = None
    """``backend="openai"`` only: the server's URL, up to and including ``/v1``."""
    api_key: str | None = field(default=None, repr=False)
    """``backend="openai"`` only: sent as ``Authorization: Bearer``; never shown in reprs."""
    kv_slots: int | None = None
    """Cached conversations (KV-cache slots) per loaded model; None: chosen from the KV size."""
    n_gpu_layers: int | None = None
    """llama.cpp only: layers offloaded to the GPU (-1: all); None: none (CPU)."""
    flash_attn: bool | None = None
    """llama.cpp only: flash attention; None: llama.cpp's default for this client (off)."""
    main_gpu: int | None = None
    """llama.cpp only: the GPU that holds the whole model or its small tensors."""
    tensor_split: tuple[float, ...] | None = None
    """llama.cpp only: the share of the model each GPU holds."""
    cuda_graphs: bool | None = None
    """transformers only: short passes replayed as CUDA graphs; None: where the model allows."""
    draft_tokens: int = 0
    """Prompt-lookup speculation (``prompt_lookup``): the longest draft per forward pass; 0: off."""


MAX_KV_SLOTS = 64
LLAMA_CPP_ONLY_OPTIONS = ("n_gpu_layers", "flash_attn", "main_gpu", "tensor_split")


def check_kv_slots(value: object, *, param: str = "kv_slots") -> int:
    """A number of KV-cache slots: an integer from 1 to :data:`MAX_KV_SLOTS`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KV_SLOTS:
        raise InvalidRequestError(f"{param} must be an integer from 1 to {MAX_KV_SLOTS}, got {value!r}",
                                  param=param)
    return value


def check_gpu_options(n_gpu_layers: object, flash_attn: object, main_gpu: object,
                      tensor_split: object) -> tuple[int | None, bool | None, int | None, tuple[float, ...] | None]:
    """The llama.cpp GPU options, type-checked (whether the build has a GPU is checked at load)."""
    if n_gpu_layers is not None and (isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int)
                                     or n_gpu_layers < -1):
        raise InvalidRequestError(f"n_gpu_layers must be an integer >= -1 (-1 offloads every layer), "
                                  f"got {n_gpu_layers!r}", param="n_gpu_layers")
    if flash_attn is not None and not isinstance(flash_attn, bool):
        raise InvalidRequestError(f"flash_attn must be True or False, got {flash_attn!r}", param="flash_attn")
    if main_gpu is not None and (isinstance(main_gpu, bool) or not isinstance(main_gpu, int) or main_gpu < 0):
        raise InvalidRequestError(f"main_gpu must be a GPU index >= 0, got {main_gpu!r}", param="main_gpu")
    split: tuple[float, ...] | None = None
    if tensor_split is not None:
        if isinstance(tensor_split, (str, bytes)) or not isinstance(tensor_split, (list, tuple)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in tensor_split) \
                or not any(tensor_split):
            raise InvalidRequestError(
                f"tensor_split must be a list of non-negative numbers, one per GPU, not all zero "
                f"(e.g. [3, 1]), got {tensor_split!r}", param="tensor_split")
        split = tuple(float(x) for x in tensor_split)
    return n_gpu_layers, flash_attn, main_gpu, split


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(ENV_PREFIX + name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def normalize_backend(value: str, *, source: str) -> str:
    key = value.strip().lower()
    if key not in _BACKEND_SPELLINGS:
        raise InvalidRequestError(
            f"{source} must be one of {list(KNOWN_BACKENDS)}, got {value!r}", param=source
        )
    return _BACKEND_SPELLINGS[key]


def check_sampling(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    if not low <= float(value) <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


def resolve_settings(
    *,
    model: str | None,
    model_path: str | os.PathLike[str] | None,
    backend: str | None,
    context_length: int | None,
    temperature: float,
    top_p: float,
    cache_dir: str | os.PathLike[str] | None,
    n_threads: int | None,
    dtype: str | None,
    device: str | None,
    base_url: str | None = None,
    api_key: str | None = None,
    environ: Mapping[str, str] | None = None,
    kv_slots: int | None = None,
    n_gpu_layers: int | None = None,
    flash_attn: bool | None = None,
    main_gpu: int | None = None,
    tensor_split: Sequence[float] | None = None,
    prompt_lookup: bool | int | None = None,
    cuda_graphs: bool | None = None,
) -> Settings:
    """Combine arguments, environment and defaults into validated :class:`Settings`."""
    env = os.environ if environ is None else environ

    if backend is not None:
        resolved_backend = normalize_backend(backend, source="backend")
    elif (env_backend := _env(env, "BACKEND")) is not None:
        resolved_backend = normalize_backend(env_backend, source=ENV_PREFIX + "BACKEND")
    else:
        resolved_backend = DEFAULT_BACKEND

    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 16:
            raise InvalidRequestError(
                f"context_length must be an integer >= 16, got {context_length!r}", param="context_length"
            )
        resolved_ctx = context_length
    elif (env_ctx := _env(env, "CONTEXT_LENGTH")) is not None:
        try:
            resolved_ctx = int(env_ctx)
        except ValueError:
            resolved_ctx = -1
        if resolved_ctx < 16:
            raise InvalidRequestError(
                f"{ENV_PREFIX}CONTEXT_LENGTH must be an integer >= 16, got {env_ctx!r}",
                param=ENV_PREFIX + "CONTEXT_LENGTH",
            )
    else:
        resolved_ctx = DEFAULT_CONTEXT_LENGTH

    if model_path is not None:
        resolved_path: str | None = os.fspath(model_path)
    else:
        resolved_path = _env(env, "MODEL_PATH")
        if resolved_path is not None and model is not None and not Path(resolved_path).expanduser().is_dir():
            # An explicit model beats the environment: the variable's model file is another model
            # (a folder there is still searched for the one named).
            resolved_path = None

    if cache_dir is not None:
        resolved_cache = Path(cache_dir).expanduser()
        cache_source = "cache_dir"
    elif (env_cache := _env(env, "CACHE_DIR")) is not None:
        resolved_cache = Path(env_cache).expanduser()
        cache_source = ENV_PREFIX + "CACHE_DIR"
    else:
        resolved_cache = Path.home() / ".cache" / "local_llm_kit"
        cache_source = "cache_dir"
    if resolved_cache.exists() and not resolved_cache.is_dir():
        raise InvalidRequestError(f"{cache_source} must be a folder (models are assembled and converted there), "
                                  f"but {str(resolved_cache)!r} is a file", param=cache_source)

    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
        raise InvalidRequestError(f"n_threads must be a positive integer, got {n_threads!r}", param="n_threads")
    env_threads = _env(env, "N_THREADS") if resolved_backend != REMOTE_BACKEND else None
    if n_threads is None and env_threads is not None:
        if not env_threads.isdigit() or int(env_threads) < 1:
            raise InvalidRequestError(f"{ENV_PREFIX}N_THREADS must be a positive integer, got {env_threads!r}",
                                      param=ENV_PREFIX + "N_THREADS")
        n_threads = int(env_threads)

    resolved_url = base_url if base_url is not None else _env(env, "BASE_URL")
    resolved_key = api_key if api_key is not None else _env(env, "API_KEY")
    if resolved_backend == REMOTE_BACKEND:
        if not resolved_url:
            raise InvalidRequestError(
                f"backend='openai' needs base_url= (or {ENV_PREFIX}BASE_URL), e.g. 'http://127.0.0.1:8000/v1'",
                param="base_url")
        if not resolved_url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"base_url must be an http:// or https:// URL, got {resolved_url!r}",
                                      param="base_url")
    elif base_url is not None or api_key is not None:
        name = "base_url" if base_url is not None else "api_key"
        raise InvalidRequestError(f"{name} only applies to backend='openai' (an OpenAI-compatible server); "
                                  f"the {resolved_backend} backend runs in-process", param=name)

    if kv_slots is not None:
        kv_slots = check_kv_slots(kv_slots)
    elif (env_slots := _env(env, "KV_SLOTS")) is not None:
        kv_slots = check_kv_slots(int(env_slots) if env_slots.isdigit() else env_slots,
                                  param=ENV_PREFIX + "KV_SLOTS")
    # The variable is a default for llama.cpp clients: it neither applies to nor blocks another backend.
    env_layers = _env(env, "N_GPU_LAYERS") if resolved_backend == "llama.cpp" else None
    if n_gpu_layers is None and env_layers is not None:
        if not env_layers.removeprefix("-").isdigit() or int(env_layers) < -1:
            raise InvalidRequestError(f"{ENV_PREFIX}N_GPU_LAYERS must be an integer >= -1 (-1 offloads every layer), "
                                      f"got {env_layers!r}", param=ENV_PREFIX + "N_GPU_LAYERS")
        n_gpu_layers = int(env_layers)
    n_gpu_layers, flash_attn, main_gpu, split = check_gpu_options(n_gpu_layers, flash_attn, main_gpu, tensor_split)
    if resolved_backend != "llama.cpp":
        given = {"n_gpu_layers": n_gpu_layers, "flash_attn": flash_attn, "main_gpu": main_gpu,
                 "tensor_split": split}
        for name in LLAMA_CPP_ONLY_OPTIONS:
            if given[name] is not None:
                hint = ("; transformers places the model with device= (e.g. device='cuda')"
                        if resolved_backend == "transformers" else "; the server decides where its model runs")
                raise InvalidRequestError(f"{name} only applies to the llama.cpp backend, not {resolved_backend}"
                                          f"{hint}", param=name)
    if cuda_graphs is not None:
        if not isinstance(cuda_graphs, bool):
            raise InvalidRequestError(f"cuda_graphs must be True or False, got {cuda_graphs!r}", param="cuda_graphs")
        if resolved_backend != "transformers":
            hint = ("; llama.cpp offloads with n_gpu_layers=" if resolved_backend == "llama.cpp"
                    else "; the server decides how its model runs")
            raise InvalidRequestError(f"cuda_graphs only applies to the transformers backend, not "
                                      f"{resolved_backend}{hint}", param="cuda_graphs")
    if resolved_backend == REMOTE_BACKEND and kv_slots is not None:
        raise InvalidRequestError("kv_slots applies to in-process backends; the server manages its own cache",
                                  param="kv_slots")
    if resolved_backend == REMOTE_BACKEND and prompt_lookup is not None:
        raise InvalidRequestError("prompt_lookup applies to in-process backends; the server decides how it "
                                  "decodes", param="prompt_lookup")

    return Settings(
        model=model or DEFAULT_MODEL,
        model_path=resolved_path,
        backend=resolved_backend,
        context_length=resolved_ctx,
        temperature=check_sampling("temperature", temperature, 0.0, 2.0),
        top_p=check_sampling("top_p", top_p, 0.0, 1.0),
        cache_dir=resolved_cache,
        n_threads=n_threads,
        dtype=dtype,
        device=device,
        base_url=resolved_url.rstrip("/") if resolved_backend == REMOTE_BACKEND and resolved_url else None,
        api_key=resolved_key if resolved_backend == REMOTE_BACKEND else None,
        kv_slots=kv_slots,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        main_gpu=main_gpu,
        tensor_split=split,
        cuda_graphs=cuda_graphs,
        draft_tokens=DEFAULT_PROMPT_LOOKUP if prompt_lookup is None else draft_tokens(prompt_lookup),
    )
