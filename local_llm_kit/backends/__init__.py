"""Inference engines behind the :class:`~local_llm_kit.backends.base.Backend` contract.

Each engine lives in its own module and imports its heavy dependency (llama_cpp, torch) only
when that module is loaded, so ``import local_llm_kit`` stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from local_llm_kit.backends.base import Backend, ModelInfo
from local_llm_kit.errors import BackendNotAvailableError, InvalidRequestError

__all__ = ["BACKENDS", "Backend", "BackendOptions", "ModelInfo", "create_backend"]

# backend name -> (module, class, the pip extra that provides its engine)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llama.cpp": ("local_llm_kit.backends.llama_cpp", "LlamaCppBackend", "llama-cpp"),
    "transformers": ("local_llm_kit.backends.transformers", "TransformersBackend", "transformers"),
}


@dataclass(frozen=True)
class BackendOptions:
    """Load-time settings shared by all engines (hashable: part of the model-sharing key)."""

    n_ctx: int
    cache_dir: Path
    n_threads: int | None = None
    """CPU threads; None lets the backend pick (physical cores)."""
    dtype: str | None = None
    """transformers only: torch dtype name; None picks the backend's default."""
    device: str | None = None
    """transformers only: torch device; None picks cuda, then mps, then cpu."""
    kv_slots: int | None = None
    """Cached sequences (KV-cache slots) kept at once; None picks from the model's KV size
    (see :func:`local_llm_kit.backends.base.default_kv_slots`)."""
    n_gpu_layers: int | None = None
    """llama.cpp only: layers offloaded to the GPU (-1: all); None: 0."""
    flash_attn: bool | None = None
    """llama.cpp only: flash attention; None: off."""
    main_gpu: int | None = None
    """llama.cpp only: the GPU for the whole model (split mode none) or its small tensors."""
    tensor_split: tuple[float, ...] | None = None
    """llama.cpp only: the proportion of the model each GPU holds."""
    cuda_graphs: bool | None = None
    """transformers only: replay short forward passes as CUDA graphs over static KV caches;
    None: on where the model is on CUDA and has only full-attention layers."""


def create_backend(name: str, path: str, options: BackendOptions) -> Backend:
    """Load ``path`` with the engine called ``name``."""
    if name not in BACKENDS:
        raise InvalidRequestError(
            f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}", param="backend"
        )
    module_name, class_name, extra = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendNotAvailableError(
            f"the {name!r} backend needs packages that are not installed ({exc}); "
            f"install them with: {install_command(extra)}"
        ) from exc
    backend_class: type[Backend] = getattr(module, class_name)
    return backend_class(path, options)  # type: ignore[call-arg,arg-type]


def install_command(extra: str) -> str:
    """``pip install`` of what this package's ``extra`` brings, named package by package: the name
    ``local-llm-kit`` on PyPI is another project's, so ``pip install 'local-llm-kit[extra]'``
    could fetch that one instead of adding the extra's packages to this one."""
    import importlib.metadata
    import re

    try:
        requirements = importlib.metadata.requires("local-llm-kit") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requirements = []
    marker = re.compile(rf"""^(?P<spec>[^;]+);.*\bextra\s*==\s*["']{re.escape(extra)}["']""")
    packages = [m.group("spec").strip() for r in requirements if (m := marker.match(r))]
    if not packages:
        return f"pip install -e '.[{extra}]' in a checkout of local_llm_kit"
    return "pip install " + " ".join(f"'{p}'" if any(c in p for c in "<>=!~ ") else p for p in packages)
