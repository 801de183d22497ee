"""Shared GGUF parsing during a conversion (local_llm_kit.backends._gguf_memo): one parse per
file in the converting thread, gguf's and transformers' own behaviour everywhere else."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
loader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")

from local_llm_kit.backends._gguf_memo import shared_gguf_parsing  # noqa: E402


@pytest.fixture()
def small_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_file_is_read_once_in_the_block_and_afresh_outside(small_gguf: Path) -> None:
    original = gguf.GGUFReader
    with shared_gguf_parsing():
        first, again = gguf.GGUFReader(small_gguf), gguf.GGUFReader(str(small_gguf))
        assert first is again
        assert len(first.fields["tokenizer.ggml.tokens"].data) == 3  # the file's three tokens
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original  # put back
    assert gguf.GGUFReader(small_gguf) is not gguf.GGUFReader(small_gguf)


def test_other_threads_read_for_themselves_while_a_block_runs(small_gguf: Path) -> None:
    seen: list[object] = []

    def other() -> None:
        seen.extend([gguf.GGUFReader(small_gguf), gguf.GGUFReader(small_gguf)])

    with shared_gguf_parsing():
        mine = gguf.GGUFReader(small_gguf)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(seen) == 2 and seen[0] is not seen[1] and mine not in seen


def test_nested_and_overlapping_blocks_restore_the_originals_once_all_have_ended(small_gguf: Path) -> None:
    original_reader, original_loader = gguf.GGUFReader, loader.load_gguf_checkpoint
    started, finish = threading.Event(), threading.Event()

    def long_conversion() -> None:
        with shared_gguf_parsing():
            started.set()
            finish.wait(5)

    thread = threading.Thread(target=long_conversion)
    thread.start()
    started.wait(5)
    with shared_gguf_parsing(), shared_gguf_parsing():
        assert gguf.GGUFReader(small_gguf) is gguf.GGUFReader(small_gguf)
    assert gguf.GGUFReader is not original_reader  # the other thread's block still runs
    finish.set()
    thread.join()
    assert gguf.GGUFReader is original_reader and loader.load_gguf_checkpoint is original_loader


def test_parsed_metadata_is_shared_but_each_caller_gets_its_own_copy(monkeypatch: pytest.MonkeyPatch,
                                                                     small_gguf: Path) -> None:
    calls: list[dict[str, object]] = []

    def fake_load(path: object, **kwargs: object) -> dict[str, object]:
        calls.append(kwargs)
        return {"config": {"vocab": ["a", "b"]}}

    monkeypatch.setattr(loader, "load_gguf_checkpoint", fake_load)
    with shared_gguf_parsing():
        config = loader.load_gguf_checkpoint(small_gguf, return_tensors=False)["config"]
        config["vocab"].append("changed by the first caller")
        assert loader.load_gguf_checkpoint(str(small_gguf), return_tensors=False)["config"] == {"vocab": ["a", "b"]}
        loader.load_gguf_checkpoint(small_gguf, return_tensors=True)  # the weights: not memoized
    assert calls == [{"return_tensors": False}, {"return_tensors": True}]
    assert loader.load_gguf_checkpoint is fake_load
