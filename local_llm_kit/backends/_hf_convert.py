"""Convert a GGUF file once into a cached Hugging Face model folder for the transformers backend.

transformers can read a GGUF file (``from_pretrained(folder, gguf_file=name)``) but does so by
dequantizing every tensor in Python, which takes 15-50 s for a 100-250 MB file, on every load.
So the first load converts the file into an ordinary Hugging Face folder and every later load
reads that folder (about a second). ``save_pretrained`` refuses a GGUF-loaded model ("quantized
with gguf"), so the folder is written by hand:

* ``model.safetensors``: the dequantized ``state_dict()`` in float32, whatever dtype the caller
  asks for later (one entry serves every dtype; converting a GGUF to bf16 loses nothing that
  converting from float32 would keep). A tied ``lm_head.weight`` is left out: it shares storage
  with the embeddings, which safetensors refuses, and ``from_pretrained`` re-ties it.
* the tokenizer, with the pre-tokenizer llama.cpp uses for this vocabulary where transformers'
  GGUF loader lacks it (see :func:`_align_pre_tokenizer`), so both backends tokenize alike.
* ``config.json`` without ``quantization_config`` (else transformers looks for the GGUF again),
  ``generation_config.json``, and the tokenizer as ``tokenizer.save_pretrained`` writes it.
* ``local_llm_kit.json``: the completion marker, written last.

Cache layout, under ``<cache_dir>/transformers/``::

    <key>/                     a complete entry (has the marker)
    .<key>.<host>-<pid>.tmp/   an entry being written by process <pid> of <host>
    index/<fingerprint>.json   memo: (path, size, mtime) fingerprint -> sha256 of the content

Keying. An entry is named by the first 16 hex digits of the SHA-256 of the file's *content*, so
the same model copied to two places shares one entry and a file replaced by another at the same
path never reads a stale entry. Hashing costs about 1.2 s per GB here (0.12 s for SmolLM2, 0.28 s
for Gemma 3 270M), which would dominate the load time of a cached multi-GB model, so the hash is
memoized in ``index/`` under a fingerprint of (resolved path, size, mtime in ns): a later load
only ``stat``s the file. Changing a file in place while keeping its size and nanosecond mtime
would defeat the memo; that takes deliberate effort and is accepted.

Atomicity. An entry is written into a temporary sibling directory, the marker last, then renamed
into place (``os.rename`` of a directory is atomic on one filesystem). A directory at the entry's
name without a valid marker (an interrupted older writer, a manual copy, an older format) is
removed and rebuilt, never loaded. Two processes converting the same file at once each write
their own temporary directory; the loser of the rename discards its copy and uses the winner's.
Nothing is fsynced: an entry damaged by a crash of the machine fails to load, and the backend
then removes it and converts again (``TransformersBackend._load``).

Progress: a tqdm bar over the four conversion steps, shown when stderr is a terminal
(``disable=None``), besides transformers' own bar over the tensors; log records go to this
module's logger.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from local_llm_kit.backends._gguf_memo import shared_gguf_parsing
from local_llm_kit.errors import ModelLoadError

__all__ = ["CACHE_SUBDIR", "MARKER_NAME", "cached_hf_folder", "file_sha256", "is_gguf_file"]

logger = logging.getLogger(__name__)

CACHE_SUBDIR = "transformers"
MARKER_NAME = "local_llm_kit.json"
FORMAT_VERSION = 1
"""Bump when the entry layout changes: entries with another version are rebuilt."""
_GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 1 << 22
# Errors of writing the cache (full disk, quota, read-only filesystem), reported as such.
_CACHE_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic bytes (cheap; says nothing of the rest)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cached_hf_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """Return a complete Hugging Face folder for ``gguf_path``, converting it on first use.

    Raises :class:`ModelLoadError` when the file is not a GGUF file transformers can load.
    """
    if not is_gguf_file(gguf_path):
        raise ModelLoadError(f"{gguf_path} is not a GGUF file (it does not start with b'GGUF')")
    root = cache_dir / CACHE_SUBDIR
    sha256 = _content_sha256(gguf_path, root)
    entry = root / sha256[:16]
    if _read_marker(entry, sha256) is not None:
        logger.debug("using converted model %s for %s", entry, gguf_path)
        return entry
    if entry.exists():
        logger.warning("cache entry %s is incomplete or outdated; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
    _convert(gguf_path, entry, sha256)
    return entry


# -- content key ----------------------------------------------------------------------------------


def _content_sha256(path: Path, root: Path) -> str:
    """SHA-256 of ``path``'s content, memoized by (resolved path, size, mtime_ns)."""
    stat = path.stat()
    fingerprint = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = root / "index" / f"{hashlib.sha256(fingerprint.encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads(memo.read_text(encoding="utf-8"))
        if recorded["fingerprint"] == fingerprint and len(recorded["sha256"]) == 64:
            return str(recorded["sha256"])
    started = time.perf_counter()
    sha256 = file_sha256(path)
    logger.debug("hashed %s in %.2f s", path, time.perf_counter() - started)
    with contextlib.suppress(OSError):  # a read-only cache still works, just hashes every time
        _write_json_atomic(memo, {"fingerprint": fingerprint, "sha256": sha256})
    return sha256


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _read_marker(entry: Path, sha256: str) -> dict[str, Any] | None:
    """The entry's marker if the entry is complete, for this content and this format."""
    try:
        marker = json.loads((entry / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    if marker.get("sha256") != sha256 or marker.get("format_version") != FORMAT_VERSION:
        return None
    return marker


# -- conversion -----------------------------------------------------------------------------------


def _convert(gguf_path: Path, entry: Path, sha256: str) -> None:
    """Write the entry for ``gguf_path`` into a temporary sibling, then rename it into place."""
    _remove_stale_temporaries(entry)
    tmp = entry.with_name(_temporary_name(entry, os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:  # a read-only cache: say so, rather than a bare PermissionError
        raise ModelLoadError(
            f"cannot convert {gguf_path.name} for transformers: the cache {entry.parent} is not writable ({exc}); "
            "point cache_dir or LOCAL_LLM_KIT_CACHE_DIR at a writable folder") from exc
    logger.info("converting %s for transformers into %s (once)", gguf_path, entry)
    started = time.perf_counter()
    try:
        _write_entry(gguf_path, tmp, sha256)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written entry behind
        if not isinstance(exc, Exception) or isinstance(exc, MemoryError):
            raise  # cancellation, interrupt, exit: not a property of the file
        if isinstance(exc, OSError) and exc.errno in _CACHE_WRITE_ERRNOS:  # the disk, not the file
            raise ModelLoadError(
                f"cannot convert {gguf_path.name} for transformers: writing the converted model into "
                f"{entry.parent} failed ({exc}); free disk space or point cache_dir or "
                "LOCAL_LLM_KIT_CACHE_DIR at a writable folder with room") from exc
        raise ModelLoadError(f"transformers could not load the GGUF file {gguf_path}: {exc}") from exc
    try:
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_marker(entry, sha256) is None:  # not a concurrent writer's complete entry
            raise
        logger.info("another process converted %s first; using its entry", gguf_path)
        return
    logger.info("converted %s in %.1f s", gguf_path, time.perf_counter() - started)


def _write_entry(gguf_path: Path, out: Path, sha256: str) -> None:
    # Imported here so that the cache helpers above stay importable without torch.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=4, desc=f"Converting {name}", unit="step", disable=None) as steps, shared_gguf_parsing():
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        metadata = gguf_string_metadata(gguf_path, ("tokenizer.ggml.model", "tokenizer.ggml.pre"))
        _align_pre_tokenizer(
            tokenizer, metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
        )
        tokenizer.save_pretrained(out)
        steps.update()

        steps.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
        steps.update()

        steps.set_postfix_str("saving weights")
        save_file(_unshared_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        steps.update()

        steps.set_postfix_str("config")
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        marker = {
            "format_version": FORMAT_VERSION,
            "sha256": sha256,
            "source": str(gguf_path.resolve()),
            "source_size": gguf_path.stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The marker goes last: its presence is the statement that everything else is there.
        (out / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        steps.update()


# llama.cpp pre-tokenizer types that isolate every numeric character (\p{N}) before GPT-2's split
# (llama-vocab.cpp). transformers 5.24's GGUF loader does not know them and keeps GPT-2's split
# alone, which tokenizes e.g. " ½" differently from llama.cpp and from the original tokenizer.json.
_ISOLATE_NUMBERS_PRE_TYPES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
# Types whose split is GPT-2's own: nothing to change.
_GPT2_PRE_TYPES = frozenset({"default", "gpt2", "mpt", "olmo", "jais", "trillion"})


def _align_pre_tokenizer(tokenizer: Any, model: str | None, pre: str | None) -> None:
    """Give a byte-level BPE tokenizer read from GGUF the split llama.cpp uses for ``pre``.

    Only a tokenizer left with the bare ``ByteLevel`` pre-tokenizer is touched: when transformers
    recognised the type and set its own split, it is kept.
    """
    if model != "gpt2" or pre is None or pre in _GPT2_PRE_TYPES:
        return
    from tokenizers import Regex, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    current = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return
    if pre in _ISOLATE_NUMBERS_PRE_TYPES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        logger.debug("pre-tokenizer %r: isolating numeric characters, as llama.cpp does", pre)
    else:
        logger.warning(
            "GGUF pre-tokenizer type %r is unknown here; the transformers backend may tokenize "
            "some text differently from llama.cpp", pre,
        )  # fmt: skip


def gguf_string_metadata(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """The string values of ``keys`` in a GGUF file's metadata, read without loading tensors.

    ``gguf.GGUFReader`` would take 3-13 s on these files (it builds an object per vocabulary
    entry); this walks the key-value section and skips arrays by their lengths.
    """
    wanted, found = set(keys), {}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != _GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        (n_kv,) = struct.unpack_from("<Q", buf, 16)
        offset = 24
        for _ in range(n_kv):
            key, offset = _read_string(buf, offset)
            (value_type,) = struct.unpack_from("<I", buf, offset)
            offset += 4
            if value_type == _GGUF_STRING and key in wanted:
                found[key], offset = _read_string(buf, offset)
                if len(found) == len(wanted):
                    break
            else:
                offset = _skip_value(buf, offset, value_type)
    return found


_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    start = offset + 8
    return bytes(buf[start : start + length]).decode("utf-8", errors="replace"), start + length


def _skip_value(buf: mmap.mmap, offset: int, value_type: int) -> int:
    if value_type == _GGUF_STRING:
        (length,) = struct.unpack_from("<Q", buf, offset)
        return offset + 8 + int(length)
    if value_type == _GGUF_ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        if item_type in _GGUF_WIDTH:
            return offset + int(count) * _GGUF_WIDTH[item_type]
        for _ in range(count):
            offset = _skip_value(buf, offset, item_type)
        return offset
    if value_type not in _GGUF_WIDTH:
        raise ValueError(f"unknown GGUF metadata type {value_type}")
    return offset + _GGUF_WIDTH[value_type]


def _unshared_state_dict(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` without tied copies, every tensor with storage of its own.

    A tied weight (``lm_head.weight`` is the embedding matrix) appears twice as the very same
    tensor; safetensors refuses shared storage and ``from_pretrained`` re-ties it from the config,
    so the second name is dropped. A tensor that merely overlaps another's storage is copied.
    """
    state: dict[str, Any] = {}
    seen_tensors: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    seen_storages: set[int] = set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity in seen_tensors:
            logger.debug("not storing %s: it is tied to an earlier tensor", key)
            continue
        seen_tensors.add(identity)
        storage = tensor.untyped_storage().data_ptr()
        state[key] = tensor.clone() if storage in seen_storages else tensor.contiguous()
        seen_storages.add(storage)
    return state


def _temporary_name(entry: Path, pid: int) -> str:
    return f".{entry.name}.{_HOST}-{pid}.tmp"


def _remove_stale_temporaries(entry: Path) -> None:
    """Remove temporary directories for ``entry`` left by dead processes of this host."""
    if not entry.parent.is_dir():
        return
    prefix = f".{entry.name}.{_HOST}-"
    for tmp in entry.parent.glob(f"{prefix}*.tmp"):
        try:
            pid = int(tmp.name[len(prefix) : -len(".tmp")])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            logger.info("removing %s, left by an interrupted conversion", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True
