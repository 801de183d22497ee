"""Faults (issue 8, "The reliability suite"): each gives a clear error or a clean recovery, and the
next request works.

* damaged weights: truncated and corrupted GGUF files, loaded in a child process so that a crash
  inside llama.cpp fails the test instead of killing the test run;
* the transformers conversion cache: a missing, half-written, damaged or read-only entry, and a
  disk that fills up during conversion;
* streams abandoned mid-generation or broken by an exception in their consumer;
* ``KeyboardInterrupt`` and asyncio task cancellation during generation and during load.

The real model is SmolLM2 on llama.cpp (transformers for the conversion cache). Where recovery
means converting the GGUF again (a minute of CPU here), the dequantization step is replaced by
a writer that links the files of a conversion done for real once per session; everything else
(the cache's bookkeeping, transformers loading the entry, generation) is real.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import gc
import io
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from local_llm_kit import AsyncLLMClient, LLMClient
from local_llm_kit.backends import BackendOptions
from local_llm_kit.backends import _hf_convert as conv
from local_llm_kit.backends.llama_cpp import LlamaCppBackend
from local_llm_kit.errors import ModelLoadError
from tests.reliability.support import (
    GREEDY_QUESTION,
    GREEDY_TOKENS,
    MODEL,
    check_chunks,
    greedy_answer,
    private_client,
)

LONG_QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def _wait_until(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.fixture(scope="module")
def smol_gguf(cache_dir: Path) -> Path:
    """The packaged SmolLM2 GGUF file (resolving it loads nothing)."""
    return LLMClient(MODEL, cache_dir=cache_dir).resolved_model.path


# -- damaged GGUF files ---------------------------------------------------------------------------

# Loads each file in a child process and prints one line per file: a crash (SIGSEGV, abort) of
# llama.cpp shows as a non-zero return code there, not as the death of pytest.
_PROBE = r"""
import sys
from local_llm_kit import LLMClient
from local_llm_kit.errors import ModelLoadError
for path in sys.argv[1:]:
    try:
        with LLMClient(path, backend="llama.cpp", temperature=0, context_length=256) as client:
            client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        print(path, "LOADED", flush=True)
    except ModelLoadError as exc:
        print(path, "ModelLoadError", " ".join(str(exc).split())[:300], flush=True)
"""


def _damaged_copies(source: Path, folder: Path) -> dict[str, Path]:
    data = source.read_bytes()
    rng = random.Random(8)
    n_tensors_at, n_kv_at = 8, 16  # GGUF header: magic, version (u32), n_tensors (u64), n_kv (u64)
    variants: dict[str, bytes] = {
        "magic_only": data[:4],
        "header_only": data[:24],
        "truncated_in_metadata": data[:64 * 1024],
        "truncated_in_tensor_data": data[: len(data) // 2],
        "missing_last_byte": data[:-1],
        "bad_version": data[:4] + (99).to_bytes(4, "little") + data[8:],
        "huge_tensor_count": data[:n_tensors_at] + (2**62).to_bytes(8, "little") + data[16:],
        "huge_kv_count": data[:n_kv_at] + (2**62).to_bytes(8, "little") + data[24:],
        "garbled_metadata": data[:24] + rng.randbytes(4096) + data[24 + 4096:],
    }
    paths = {}
    for name, content in variants.items():
        path = folder / f"{name}.gguf"
        path.write_bytes(content)
        paths[name] = path
    return paths


@pytest.mark.slow
def test_truncated_or_corrupted_gguf_files_raise_model_load_error_without_crashing(
        smol_gguf: Path, tmp_path: Path, smol: LLMClient, smol_reference: str) -> None:
    paths = _damaged_copies(smol_gguf, tmp_path)
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, paths.values())], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    outcome = {Path(line.split(" ", 1)[0]).stem: line.split(" ", 2)[1:] for line in done.stdout.splitlines()}
    assert done.returncode == 0, f"the child process died (rc {done.returncode}) after {outcome}: {done.stderr[-2000:]}"
    for name in paths:
        assert name in outcome, f"{name}: no outcome ({done.stderr[-1000:]})"
        kind, *message = outcome[name]
        assert kind == "ModelLoadError", f"{name} loaded: a damaged file must be refused"
        assert message and paths[name].name in message[0], message  # the error names the file
    # The model in use here is unaffected.
    assert greedy_answer(smol) == smol_reference


# -- the transformers conversion cache ------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(smol_gguf: Path, cache_dir: Path) -> Path:
    """A complete conversion of SmolLM2, done for real (once; shared with the other transformers tests)."""
    pytest.importorskip("transformers")
    return conv.cached_hf_folder(smol_gguf, cache_dir)


class LinkingWriter:
    """Stands in for the dequantization in ``_write_entry``: links the files of a real conversion."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls = 0

    def __call__(self, gguf_path: Path, out: Path, sha256: str) -> None:
        self.calls += 1
        marker = self.source / conv.MARKER_NAME
        for item in sorted(self.source.iterdir()):
            if item != marker:
                os.link(item, out / item.name)
        shutil.copy(marker, out / conv.MARKER_NAME)  # the marker last, as the real writer does


def _answer_with_transformers(cache: Path) -> str:
    # Two tokens: enough to show the loaded entry answers; torch on this CPU is slow per token.
    with LLMClient(MODEL, backend="transformers", temperature=0, cache_dir=cache) as client:
        reply = client.chat.completions.create(messages=GREEDY_QUESTION, max_tokens=2)
    text = reply.choices[0].message.content or ""
    assert text.strip()
    return text


def _entry(cache: Path, converted: Path) -> Path:
    return cache / conv.CACHE_SUBDIR / converted.name


def _leftovers(cache: Path) -> list[str]:
    root = cache / conv.CACHE_SUBDIR
    return sorted(p.name for p in root.iterdir() if p.name != "index") if root.is_dir() else []


def _link_entry(converted: Path, entry: Path) -> None:
    entry.mkdir(parents=True)
    for item in converted.iterdir():
        os.link(item, entry / item.name)


def _damage(path: Path) -> None:
    """Replace ``path`` by its first half: a new file, so that a linked original stays intact."""
    half = path.read_bytes()[: path.stat().st_size // 2]
    path.unlink()
    path.write_bytes(half)


def _same_files(entry: Path, converted: Path) -> bool:
    return sorted(p.name for p in entry.iterdir()) == sorted(p.name for p in converted.iterdir()) and all(
        (entry / p.name).stat().st_size == p.stat().st_size for p in converted.iterdir())


@pytest.mark.slow
def test_half_written_damaged_and_missing_cache_entries_are_rebuilt_not_loaded(
        smol_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = LinkingWriter(converted)
    monkeypatch.setattr(conv, "_write_entry", writer)
    # Damaged after completion: the marker is there but the weights are cut short. transformers
    # fails to load it; the backend removes it, converts again and loads the new entry.
    cache = tmp_path / "damaged"
    entry = _entry(cache, converted)
    _link_entry(converted, entry)
    _damage(entry / "model.safetensors")
    assert _answer_with_transformers(cache)
    assert writer.calls == 1 and _leftovers(cache) == [entry.name] and _same_files(entry, converted)
    # Half-written (an interrupted writer left files but no completion marker), and missing: the
    # cache hands out a rebuilt entry, never the half-written one.
    for name in ("half-written", "missing"):
        cache = tmp_path / name
        entry = _entry(cache, converted)
        if name == "half-written":
            _link_entry(converted, entry)
            (entry / conv.MARKER_NAME).unlink()
            _damage(entry / "model.safetensors")
        calls = writer.calls
        assert conv.cached_hf_folder(smol_gguf, cache) == entry
        assert writer.calls == calls + 1 and _leftovers(cache) == [entry.name] and _same_files(entry, converted)
        assert conv.cached_hf_folder(smol_gguf, cache) == entry and writer.calls == calls + 1  # now reused


def _sha(converted: Path) -> str:
    return str(conv.json.loads((converted / conv.MARKER_NAME).read_text())["sha256"])


def _under(path: Any, root: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(root.resolve())
    except (TypeError, ValueError):
        return False


@contextmanager
def read_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``root`` behave as a read-only filesystem (EROFS) for this process.

    Tests run as root here, which file modes do not stop, so the write operations the cache uses
    are refused by path instead.
    """

    def refuse(path: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    def guard(function: Any, n_paths: int = 1) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            for path in args[:n_paths]:
                if _under(path, root):
                    refuse(path)
            return function(*args, **kwargs)
        return guarded

    real_open, real_rmtree = builtins.open, shutil.rmtree

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+") and not isinstance(file, int) and _under(file, root):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_rmtree(path: Any, ignore_errors: bool = False, *args: Any, **kwargs: Any) -> None:
        if _under(path, root):
            if ignore_errors:
                return
            refuse(path)
        real_rmtree(path, ignore_errors, *args, **kwargs)

    with monkeypatch.context() as patch:
        for name in ("mkdir", "unlink", "rmdir", "remove"):
            patch.setattr(os, name, guard(getattr(os, name)))
        for name in ("rename", "replace", "link"):
            patch.setattr(os, name, guard(getattr(os, name), 2))
        patch.setattr(builtins, "open", guarded_open)
        patch.setattr(io, "open", guarded_open)
        patch.setattr(shutil, "rmtree", guarded_rmtree)
        yield


@pytest.mark.slow
def test_a_read_only_cache_serves_complete_entries_and_refuses_clearly_to_convert(
        smol_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from local_llm_kit.backends.transformers import TransformersBackend

    writer = LinkingWriter(converted)
    monkeypatch.setattr(conv, "_write_entry", writer)
    complete, empty, half = tmp_path / "complete", tmp_path / "empty", tmp_path / "half"
    _link_entry(converted, _entry(complete, converted))
    (empty / conv.CACHE_SUBDIR).mkdir(parents=True)
    _link_entry(converted, _entry(half, converted))
    (_entry(half, converted) / conv.MARKER_NAME).unlink()
    for cache in (complete, empty, half):
        with read_only(cache, monkeypatch):
            if cache is complete:  # served as is (loading it is what the other tests do)
                assert conv.cached_hf_folder(smol_gguf, cache) == _entry(complete, converted)
                continue
            options = BackendOptions(n_ctx=256, cache_dir=cache)
            with pytest.raises(ModelLoadError, match="not writable") as info:
                TransformersBackend(str(smol_gguf), options)
            assert str(cache) in str(info.value) and "cache_dir" in str(info.value)
    assert writer.calls == 0
    assert _leftovers(empty) == [] and not (_entry(half, converted) / conv.MARKER_NAME).exists()
    # Writable again: the half-written entry is rebuilt.
    assert conv.cached_hf_folder(smol_gguf, half) == _entry(half, converted)
    assert writer.calls == 1 and _same_files(_entry(half, converted), converted)


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


@pytest.mark.slow
def test_a_full_disk_during_conversion_is_a_clear_error_and_leaves_nothing_behind(
        smol_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    real_open = builtins.open

    def full_disk_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+") and not isinstance(file, int) and _under(file, cache):
            return _FullDisk(opened)
        return opened

    # The real conversion (tokenizer from the GGUF first): its first write fails with ENOSPC.
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", full_disk_open)
        patch.setattr(io, "open", full_disk_open)
        with pytest.raises(ModelLoadError) as info:
            conv.cached_hf_folder(smol_gguf, cache)
    message = str(info.value)
    assert "No space left on device" in message and "free disk space" in message and str(cache) in message
    assert _leftovers(cache) == []  # no entry, no temporary directory
    # Space again: the next load converts.
    monkeypatch.setattr(conv, "_write_entry", LinkingWriter(converted))
    assert _same_files(conv.cached_hf_folder(smol_gguf, cache), converted)


@pytest.mark.slow
def test_an_interrupt_while_transformers_loads_keeps_the_conversion_cache(
        smol_gguf: Path, converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from local_llm_kit.backends import transformers as tb

    cache = tmp_path / "cache"
    entry = _entry(cache, converted)
    _link_entry(converted, entry)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tb.AutoModelForCausalLM, "from_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _answer_with_transformers(cache)
    assert conv._read_marker(entry, _sha(converted)) is not None  # not mistaken for a damaged entry
    assert not _engines_for(cache, "transformers")


# -- streams --------------------------------------------------------------------------------------


def test_a_sync_stream_abandoned_mid_generation_frees_the_model(smol: LLMClient, smol_reference: str) -> None:
    stream = smol.chat.completions.create(messages=LONG_QUESTION, max_tokens=64, stream=True)
    for _ in range(4):
        next(stream)
    assert smol.engine.lease.busy
    del stream
    assert not smol.engine.lease.busy
    assert greedy_answer(smol) == smol_reference


async def test_an_async_stream_abandoned_mid_generation_frees_the_model(smol: LLMClient, smol_reference: str) -> None:
    client = AsyncLLMClient(MODEL, temperature=0, cache_dir=smol.settings.cache_dir)
    client._resolved, client._engine = smol.resolved_model, smol.engine
    stream = await client.chat.completions.create(messages=LONG_QUESTION, max_tokens=64, stream=True)
    for _ in range(4):
        await stream.__anext__()
    del stream
    gc.collect()
    assert await asyncio.to_thread(_wait_until, lambda: not smol.engine.lease.busy)
    reply = await client.chat.completions.create(messages=GREEDY_QUESTION, max_tokens=GREEDY_TOKENS)
    assert reply.choices[0].message.content == smol_reference


class ConsumerError(Exception):
    pass


def _consume_until_error(stream: Any, n: int, seen: list[Any]) -> None:
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == n:
            raise ConsumerError("the consumer failed")


def test_an_exception_in_a_stream_consumer_leaves_the_model_usable(smol: LLMClient, smol_reference: str) -> None:
    whole = smol.chat.completions.create(messages=LONG_QUESTION, max_tokens=24).choices[0].message.content
    # Inside a with block: the stream is closed on the way out.
    with pytest.raises(ConsumerError), smol.chat.completions.create(
            messages=LONG_QUESTION, max_tokens=24, stream=True) as stream:
        _consume_until_error(stream, 3, [])
    assert not smol.engine.lease.busy
    assert greedy_answer(smol) == smol_reference
    # Without one, the stream stays open (the caller still holds it): another request borrows the
    # idle model, and the stream, resumed later, still produces its own reply.
    kept = smol.chat.completions.create(messages=LONG_QUESTION, max_tokens=24, stream=True)
    seen: list[Any] = []
    with pytest.raises(ConsumerError):
        _consume_until_error(kept, 3, seen)
    assert greedy_answer(smol) == smol_reference
    seen.extend(kept)
    check_chunks(seen)
    assert _text(seen) == whole
    assert not smol.engine.lease.busy


# -- interrupts and cancellation ------------------------------------------------------------------


@contextmanager
def interrupt_in_decode(monkeypatch: pytest.MonkeyPatch, at_call: int) -> Iterator[list[int]]:
    """Ctrl-C arriving while llama.cpp decodes: the interrupt surfaces when ``llama_decode`` returns.

    That is where Python delivers a SIGINT that came during a long C call, after the KV cache
    was written and before the backend recorded it.
    """
    real = llama_cpp.llama_decode
    calls = [0]

    def decode(ctx: Any, batch: Any) -> int:
        rc = int(real(ctx, batch))
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return rc

    with monkeypatch.context() as patch:
        patch.setattr(llama_cpp, "llama_decode", decode)
        patch.setattr(llama_cpp.llama_cpp, "llama_decode", decode)
        yield calls


@pytest.mark.slow
@pytest.mark.parametrize("at_call", [1, 6])  # in the prompt's prefill, and between generated tokens
def test_keyboard_interrupt_during_generation_propagates_and_the_next_request_works(
        smol: LLMClient, smol_reference: str, monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    client = private_client(smol)
    try:
        baseline = greedy_answer(client)  # something cached, as in a running application
        assert baseline == smol_reference
        with interrupt_in_decode(monkeypatch, at_call) as calls, pytest.raises(KeyboardInterrupt):
            client.chat.completions.create(messages=LONG_QUESTION, max_tokens=32)
        assert calls[0] == at_call
        assert not client.engine.lease.busy
        assert greedy_answer(client) == smol_reference
        # The same in a stream: the interrupt ends the stream, which gives the model back.
        stream = client.chat.completions.create(messages=LONG_QUESTION, max_tokens=32, stream=True)
        with interrupt_in_decode(monkeypatch, at_call), pytest.raises(KeyboardInterrupt):
            list(stream)
        assert not client.engine.lease.busy
        assert list(stream) == []  # ended, not resumable on a damaged state
        assert greedy_answer(client) == smol_reference
    finally:
        client.engine.close()


async def test_cancelling_a_task_during_generation_then_asking_again(smol: LLMClient, smol_reference: str) -> None:
    client = AsyncLLMClient(MODEL, temperature=0, cache_dir=smol.settings.cache_dir)
    client._resolved, client._engine = smol.resolved_model, smol.engine
    task = asyncio.create_task(client.chat.completions.create(messages=LONG_QUESTION, max_tokens=200))
    assert await asyncio.to_thread(_wait_until, lambda: smol.engine.lease.busy)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(_wait_until, lambda: not smol.engine.lease.busy)

    async def consume() -> None:
        stream = await client.chat.completions.create(messages=LONG_QUESTION, max_tokens=200, stream=True)
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    assert await asyncio.to_thread(_wait_until, lambda: smol.engine.lease.busy)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(_wait_until, lambda: not smol.engine.lease.busy)
    reply = await client.chat.completions.create(messages=GREEDY_QUESTION, max_tokens=GREEDY_TOKENS)
    assert reply.choices[0].message.content == smol_reference


def _engines_for(cache: Path, backend: str = "llama.cpp") -> list[Any]:
    """The shared engines loaded with this cache_dir (part of the key under which clients share one)."""
    from local_llm_kit import engine as engine_module

    with engine_module._engines_lock:
        return [e for key, e in engine_module._engines.items() if key[0] == backend and key[2].cache_dir == cache]


@pytest.mark.slow
def test_keyboard_interrupt_during_load_propagates_and_the_next_load_works(
        smol: LLMClient, smol_reference: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache_dir of its own makes this client load its own engine (same weights, same compute).
    client = LLMClient(MODEL, backend="llama.cpp", temperature=0, cache_dir=tmp_path)
    real_read_info = LlamaCppBackend._read_info

    def interrupted(self: LlamaCppBackend, *args: Any) -> Any:
        raise KeyboardInterrupt  # after llama.cpp loaded the weights, before the backend is complete

    with monkeypatch.context() as patch:
        patch.setattr(LlamaCppBackend, "_read_info", interrupted)
        with pytest.raises(KeyboardInterrupt):  # not turned into ModelLoadError
            client.load()
    assert LlamaCppBackend._read_info is real_read_info
    assert not _engines_for(tmp_path)
    try:
        assert greedy_answer(client) == smol_reference
        assert len(_engines_for(tmp_path)) == 1
    finally:
        client.close()


@pytest.mark.slow
async def test_cancelling_a_task_while_its_model_loads_then_asking_again(
        smol: LLMClient, smol_reference: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from local_llm_kit import engine as engine_module

    real_create = engine_module.create_backend
    entered, release = threading.Event(), threading.Event()
    loads = []

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        entered.set()
        release.wait(30)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(engine_module, "create_backend", slow_create)
    client = AsyncLLMClient(MODEL, backend="llama.cpp", temperature=0, cache_dir=tmp_path)
    task = asyncio.create_task(client.chat.completions.create(messages=GREEDY_QUESTION, max_tokens=GREEDY_TOKENS))
    assert await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()  # the load itself cannot be stopped mid-way; it completes in its thread
    try:
        reply = await client.chat.completions.create(messages=GREEDY_QUESTION, max_tokens=GREEDY_TOKENS)
        assert reply.choices[0].message.content == smol_reference
        assert len(loads) == 1  # the cancelled request's load is the one used, not a second one
    finally:
        await client.close()
