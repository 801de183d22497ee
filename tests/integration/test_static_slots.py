"""The CUDA-graph path's static-cache slots, checked on a CPU with the packaged SmolLM2.

On CUDA, short passes are padded to a bucket and replayed as CUDA graphs
(:mod:`local_llm_kit.backends._cuda_graphs`). The graphs only replay recorded kernels; what can
go wrong is the arithmetic around them: padding, the position each pass starts at, the window of
keys it attends, trims that are only a length. ``TransformersBackend(static_cache=True)`` runs
exactly that path eagerly on any device, so here it is compared, pass for pass, with the default
dynamic-cache backend on the same float32 weights. The graph capture itself is checked on a GPU
by ``benchmarks/bench_gpu.py`` (its ``graphs`` section; ``benchmarks/results/gpu_tiny_f32.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from local_llm_kit import LLMClient
from local_llm_kit.backends import BackendOptions
from local_llm_kit.backends._cuda_graphs import static_layout_problem
from local_llm_kit.backends.transformers import TransformersBackend
from local_llm_kit.errors import InvalidRequestError
from tests.integration.test_transformers_backend import _smollm2_path

pytestmark = pytest.mark.integration

ATOL = 2e-4  # float32: the same sums in another order (a masked window against exact keys)


@pytest.fixture(scope="module")
def pair(cache_dir: Path) -> Iterator[tuple[TransformersBackend, TransformersBackend]]:
    """(dynamic, static) backends on the same SmolLM2 weights, float32, 1,024-token context."""
    options = BackendOptions(n_ctx=1024, cache_dir=cache_dir, dtype="float32", kv_slots=3)
    dynamic = TransformersBackend(str(_smollm2_path()), options)
    static = TransformersBackend(str(_smollm2_path()), options, static_cache=True)
    yield dynamic, static
    dynamic.close()
    static.close()


def _both(pair: tuple[TransformersBackend, TransformersBackend], action: str, *args: object) -> list[object]:
    return [getattr(backend, action)(*args) for backend in pair]


def _same_logits(pair: tuple[TransformersBackend, TransformersBackend], tokens: list[int]) -> np.ndarray:
    dynamic, static = _both(pair, "forward_all", tokens)
    assert isinstance(dynamic, np.ndarray) and isinstance(static, np.ndarray)
    assert static.shape == (len(tokens), pair[0].info.n_vocab) and static.dtype == np.float32
    np.testing.assert_allclose(static, dynamic, rtol=0, atol=ATOL)
    assert (static.argmax(-1) == dynamic.argmax(-1)).all()
    return dynamic


def _start(pair: tuple[TransformersBackend, TransformersBackend], slot: int, ids: list[int]) -> None:
    """Both backends on ``slot``, emptied, then fed ``ids`` (logits compared)."""
    _both(pair, "use_slot", slot)
    _both(pair, "truncate_cache", 0)
    _same_logits(pair, ids)


def test_greedy_reply_is_the_dynamic_cache_reply(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    dynamic, static = pair
    ids = dynamic.tokenize(dynamic.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True))
    replies = []
    for backend in pair:
        backend.use_slot(0)
        backend.truncate_cache(0)
        logits, reply = backend.forward(ids), []
        for _ in range(16):  # every step a 1-token pass: bucket 1, window 256 on the static side
            reply.append(int(np.argmax(logits)))
            logits = backend.forward(reply[-1:])
        replies.append(reply)
        assert list(backend.cached_tokens) == ids + reply
    assert replies[0] == replies[1]
    assert "Paris" in static.tokenizer.decode(replies[1])


def test_every_bucket_and_window_matches(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    """Passes of every bucket size, padded or exact, across the 256, 512 and 1,024 windows."""
    dynamic, _ = pair
    words = dynamic.tokenize(" ".join(f"Lighthouse {i} stands on rock {i * 7 % 11}." for i in range(120)))
    assert len(words) > 1000
    _start(pair, 1, words[:200])  # the first pass of a slot: eager, unpadded
    at = 200
    for n in (1, 2, 3, 5, 8, 9, 16, 23, 32, 40, 64, 100, 128, 129, 1):
        _same_logits(pair, words[at:at + n])
        at += n
    assert at > 512 + 128
    assert list(pair[1].cached_tokens) == words[:at]


def test_trims_are_exact(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    """A trim only moves where the next pass starts; what lies past it is written over, not read."""
    dynamic, static = pair
    text = dynamic.tokenize("Name three rivers in Europe and the seas they flow into.")
    _start(pair, 2, text)
    static.forward(dynamic.tokenize(" Some detour that the dynamic cache never saw at all"))
    assert static.truncate_cache(len(text)) == len(text)
    assert list(static.cached_tokens) == text
    _same_logits(pair, dynamic.tokenize(" The Rhine"))
    for backend in pair:  # deeper than the detour, then longer than before
        assert backend.truncate_cache(len(text) - 4) == len(text) - 4
    _same_logits(pair, text[-4:] + dynamic.tokenize(" The Danube flows into the Black Sea, the Rhine"))
    assert static.truncate_cache(10_000) == len(static.cached_tokens)
    assert static.truncate_cache(-1) == 0 and list(static.cached_tokens) == []


def test_slots_keep_their_own_positions(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    dynamic, _ = pair
    a = dynamic.tokenize("The first conversation is about the history of lighthouses on rocky coasts.")
    b = dynamic.tokenize("A second one, much shorter.")
    _start(pair, 0, a)
    _start(pair, 1, b)
    for step in range(3):  # alternate: each slot's pass starts where that slot ended
        for slot in (0, 1):
            _both(pair, "use_slot", slot)
            _same_logits(pair, dynamic.tokenize(f" Turn {step} of slot {slot}."))
    assert list(pair[1].slot_tokens(0))[: len(a)] == a and list(pair[1].slot_tokens(1))[: len(b)] == b


def test_a_failed_pass_leaves_the_slot_usable(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    dynamic, static = pair
    ids = dynamic.tokenize("Count from one to five.")
    _start(pair, 0, ids)
    with pytest.raises(IndexError):
        static.forward([static.info.n_vocab + 5])  # an id past the embedding table
    assert list(static.cached_tokens) == []  # like the dynamic backend: emptied, not half-written
    dynamic.truncate_cache(0)
    _same_logits(pair, ids)


def test_cuda_graphs_need_cuda(cache_dir: Path) -> None:
    options = BackendOptions(n_ctx=1024, cache_dir=cache_dir, dtype="float32", cuda_graphs=True)
    with pytest.raises(InvalidRequestError, match="device='cuda'") as caught:
        TransformersBackend(str(_smollm2_path()), options)
    assert caught.value.param == "cuda_graphs"


def test_default_is_off_on_cpu_and_said_so(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    dynamic, static = pair
    assert dynamic.info.extra["cuda_graphs"] == "off" and dynamic.cuda_graphs == 0
    assert static.cuda_graphs == 0  # padded passes run eagerly off CUDA: nothing is captured
    assert static_layout_problem(dynamic.model) is None


def test_client_refuses_cuda_graphs_where_they_cannot_apply(cache_dir: Path) -> None:
    with pytest.raises(InvalidRequestError, match="transformers") as caught:
        LLMClient(backend="llama.cpp", cuda_graphs=True, cache_dir=cache_dir)
    assert caught.value.param == "cuda_graphs"
    client = LLMClient(backend="transformers", cuda_graphs=True, device="cpu", cache_dir=cache_dir)
    with pytest.raises(InvalidRequestError, match="CUDA graphs need device='cuda'"):
        client.load()


def test_a_pass_asking_for_some_rows_gets_them(pair: tuple[TransformersBackend, TransformersBackend]) -> None:
    # Speculation asks only for the rows it samples from; on the static path a pass computes the
    # rows from the first one wanted on (a padded bucket), then keeps those asked for.
    ids = pair[0].tokenize(" ".join(f"Buoy {i} marks shoal {i * 5 % 13}." for i in range(40)))[:300]
    assert len(ids) == 300
    _start(pair, 1, ids[:290])
    rows = [0, 3, 4, 9]
    dynamic, static = _both(pair, "forward_all", ids[290:], rows)
    assert isinstance(dynamic, np.ndarray) and isinstance(static, np.ndarray)
    assert static.shape == (4, pair[0].info.n_vocab)
    np.testing.assert_allclose(static, dynamic, rtol=0, atol=ATOL)
    assert (static.argmax(-1) == dynamic.argmax(-1)).all()
    assert [len(b.cached_tokens) for b in pair] == [300, 300]
