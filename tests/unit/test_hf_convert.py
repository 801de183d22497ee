"""The GGUF -> Hugging Face conversion cache, without real weights or torch.

The conversion itself (``_write_entry``) is replaced by a fake that writes a small folder, so
these tests check only the cache's bookkeeping: keying, the completion marker, atomic
publication, rebuilding incomplete entries and cleaning up after failures.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from local_llm_kit.backends import _hf_convert as conv
from local_llm_kit.errors import ModelLoadError


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


class FakeWriter:
    """Stands in for ``_write_entry``: counts calls, writes weights and the marker like it."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf_path: Path, out: Path, sha256: str) -> None:
        self.calls += 1
        (out / "model.safetensors").write_bytes(b"weights")
        if self.fail is not None:
            raise self.fail
        marker = {"format_version": conv.FORMAT_VERSION, "sha256": sha256, "source": str(gguf_path)}
        (out / conv.MARKER_NAME).write_text(json.dumps(marker))


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch) -> FakeWriter:
    fake = FakeWriter()
    monkeypatch.setattr(conv, "_write_entry", fake)
    return fake


def entries(cache_dir: Path) -> list[str]:
    root = cache_dir / conv.CACHE_SUBDIR
    return sorted(p.name for p in root.iterdir() if p.name != "index")


def test_is_gguf_file(tmp_path: Path, gguf: Path) -> None:
    assert conv.is_gguf_file(gguf)
    other = tmp_path / "x.bin"
    other.write_bytes(b"\x00" * 10)
    assert not conv.is_gguf_file(other)
    assert not conv.is_gguf_file(tmp_path / "missing.gguf")
    assert not conv.is_gguf_file(tmp_path)  # a directory


def test_entry_is_named_by_content_hash(tmp_path: Path, gguf: Path, writer: FakeWriter) -> None:
    entry = conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert entry.name == hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    assert entry.parent == tmp_path / "cache" / conv.CACHE_SUBDIR
    assert (entry / conv.MARKER_NAME).is_file()
    assert writer.calls == 1
    assert entries(tmp_path / "cache") == [entry.name]  # no temporary directory left


def test_second_call_reuses_entry_without_hashing(
    tmp_path: Path, gguf: Path, writer: FakeWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = conv.cached_hf_folder(gguf, tmp_path / "cache")
    hashed: list[Path] = []
    real_hash = conv.file_sha256

    def counting_hash(path: Path) -> str:
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(conv, "file_sha256", counting_hash)
    assert conv.cached_hf_folder(gguf, tmp_path / "cache") == first
    assert writer.calls == 1
    assert hashed == []  # the (path, size, mtime) memo answered


def test_modified_file_gets_new_entry(tmp_path: Path, gguf: Path, writer: FakeWriter) -> None:
    first = conv.cached_hf_folder(gguf, tmp_path / "cache")
    gguf.write_bytes(gguf.read_bytes() + b"more")
    second = conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert second != first
    assert writer.calls == 2


def test_same_content_elsewhere_shares_entry(tmp_path: Path, gguf: Path, writer: FakeWriter) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert conv.cached_hf_folder(gguf, tmp_path / "cache") == conv.cached_hf_folder(copy, tmp_path / "cache")
    assert writer.calls == 1


def test_entry_without_marker_is_rebuilt(tmp_path: Path, gguf: Path, writer: FakeWriter) -> None:
    entry = conv.cached_hf_folder(gguf, tmp_path / "cache")
    (entry / conv.MARKER_NAME).unlink()
    (entry / "model.safetensors").write_bytes(b"half written")
    assert conv.cached_hf_folder(gguf, tmp_path / "cache") == entry
    assert writer.calls == 2
    assert (entry / "model.safetensors").read_bytes() == b"weights"
    assert (entry / conv.MARKER_NAME).is_file()


@pytest.mark.parametrize("damage", ["garbage", "not_an_object", "other_content", "old_format"])
def test_invalid_marker_is_rebuilt(tmp_path: Path, gguf: Path, writer: FakeWriter, damage: str) -> None:
    entry = conv.cached_hf_folder(gguf, tmp_path / "cache")
    sha256 = conv.file_sha256(gguf)
    marker = {
        "garbage": "{not json",
        "not_an_object": json.dumps([sha256]),
        "other_content": json.dumps({"format_version": conv.FORMAT_VERSION, "sha256": "0" * 64}),
        "old_format": json.dumps({"format_version": conv.FORMAT_VERSION - 1, "sha256": sha256}),
    }[damage]
    (entry / conv.MARKER_NAME).write_text(marker)
    conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert writer.calls == 2


def test_failed_conversion_raises_model_load_error_and_leaves_nothing(
    tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv, "_write_entry", FakeWriter(fail=ValueError("bad tensor type 99")))
    with pytest.raises(ModelLoadError, match="bad tensor type 99"):
        conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_interrupted_conversion_propagates_and_leaves_nothing(
    tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv, "_write_entry", FakeWriter(fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_not_a_gguf_file_is_rejected_before_converting(tmp_path: Path, writer: FakeWriter) -> None:
    bogus = tmp_path / "random.gguf"
    bogus.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        conv.cached_hf_folder(bogus, tmp_path / "cache")
    assert writer.calls == 0


def test_stale_temporary_of_dead_process_is_removed(tmp_path: Path, gguf: Path, writer: FakeWriter) -> None:
    key = conv.file_sha256(gguf)[:16]
    root = tmp_path / "cache" / conv.CACHE_SUBDIR
    dead = root / conv._temporary_name(root / key, 2**22 + 12345)  # above pid_max's default
    alive = root / conv._temporary_name(root / key, 1)  # pid 1 always runs
    for tmp in (dead, alive):
        tmp.mkdir(parents=True)
    conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert not dead.exists()
    assert alive.exists()


def test_losing_a_concurrent_conversion_uses_the_winners_entry(
    tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process publishes the entry while this one converts: its copy is discarded."""
    winner = FakeWriter()

    def racing_writer(gguf_path: Path, out: Path, sha256: str) -> None:
        entry = out.parent / sha256[:16]
        entry.mkdir()
        winner(gguf_path, entry, sha256)  # the other process finishes first
        winner(gguf_path, out, sha256)

    monkeypatch.setattr(conv, "_write_entry", racing_writer)
    entry = conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert (entry / conv.MARKER_NAME).is_file()
    assert entries(tmp_path / "cache") == [entry.name]


def test_unwritable_memo_still_works(
    tmp_path: Path, gguf: Path, writer: FakeWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, data: dict[str, Any]) -> None:
        raise PermissionError(path)

    monkeypatch.setattr(conv, "_write_json_atomic", refuse)
    assert conv.cached_hf_folder(gguf, tmp_path / "cache") == conv.cached_hf_folder(gguf, tmp_path / "cache")
    assert writer.calls == 1


# -- GGUF metadata and the tokenizer's pre-tokenizer -----------------------------------------------


def test_gguf_string_metadata_skips_arrays(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("some.count", 7)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", "▁d"] * 1000)
    writer.add_array("tokenizer.ggml.scores", [0.5] * 4000)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_float32("some.scale", 1.5)
    writer.add_bool("some.flag", True)
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "general.architecture", "absent.key")
    assert conv.gguf_string_metadata(path, keys) == {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
    }


def test_gguf_string_metadata_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF v2/v3 file"):
        conv.gguf_string_metadata(path, ("general.architecture",))


def _byte_level_tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)

    class Wrapper:  # what the conversion sees of a transformers tokenizer
        backend_tokenizer = backend

    return Wrapper()


def _pieces(tokenizer: Any, text: str) -> list[str]:
    return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_smollm_pre_tokenizer_isolates_numbers_like_llama_cpp() -> None:
    tokenizer = _byte_level_tokenizer()
    assert _pieces(tokenizer, "a ½ 12") == ["a", "ĠÂ½", "Ġ12"]  # GPT-2's split alone
    conv._align_pre_tokenizer(tokenizer, "gpt2", "smollm")
    assert _pieces(tokenizer, "a ½ 12") == ["a", "Ġ", "Â½", "Ġ", "1", "2"]


@pytest.mark.parametrize(("model", "pre"), [("gpt2", "default"), ("gpt2", None), ("llama", "smollm")])
def test_other_tokenizers_are_left_alone(model: str, pre: str | None) -> None:
    tokenizer = _byte_level_tokenizer()
    conv._align_pre_tokenizer(tokenizer, model, pre)
    assert _pieces(tokenizer, "a ½ 12") == ["a", "ĠÂ½", "Ġ12"]


def test_unknown_pre_tokenizer_type_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = _byte_level_tokenizer()
    conv._align_pre_tokenizer(tokenizer, "gpt2", "some-new-type")
    assert "some-new-type" in caplog.text
    assert _pieces(tokenizer, "a ½ 12") == ["a", "ĠÂ½", "Ġ12"]
