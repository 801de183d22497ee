"""The CUDA-graph path's static-cache slots on a tiny random Llama (no weights).

Off CUDA, :class:`StaticSlot` runs the passes a graph would replay eagerly: padded to a bucket,
over a window of the static cache, each layer's length set from the input buffer. On CUDA (where
one is present) the same tests capture and replay the graphs. Both are compared with plain
transformers passes over a ``DynamicCache``. ``make test-floors`` runs this file at the
transformers floor too: the path relies on ``StaticLayer.cumulative_length``.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from transformers import DynamicCache, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig

from local_llm_kit.backends._cuda_graphs import (
    BUCKETS,
    GraphInputs,
    StaticSlot,
    bucket_for,
    static_layout_problem,
    window_for,
)

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip
VOCAB = 300
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
ATOL = {"cpu": 1e-4, "cuda": 1e-3}  # float32: the same sums in another order (other kernels on CUDA)


@pytest.fixture(scope="module", params=DEVICES)
def model(request: pytest.FixtureRequest) -> Any:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SMALL)).eval()
    return model.to(request.param)


def _close(got: Any, want: Any) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL[got.device.type])


def _kwarg(model: Any) -> str:
    # transformers 5 renamed past_key_values to cache (after the 5.18 floor)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Reference:
    """Plain transformers passes over a DynamicCache."""

    def __init__(self, model: Any) -> None:
        self.model, self.kwarg = model, _kwarg(model)
        self.cache = DynamicCache(config=model.config)
        self.length = 0

    def forward(self, tokens: list[int]) -> Any:
        ids = torch.tensor([tokens], device=self.model.device)
        logits = self.model(input_ids=ids, use_cache=True, **{self.kwarg: self.cache}).logits[0]
        self.length += len(tokens)
        return logits

    def trim(self, n_keep: int) -> None:
        self.cache.crop(n_keep - self.length)
        self.length = n_keep


def _slot(model: Any, capacity: int = 1024 + max(BUCKETS)) -> StaticSlot:
    return StaticSlot(model, _kwarg(model), capacity, GraphInputs(model.device))


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_padded_windowed_passes_equal_a_dynamic_cache(model: Any) -> None:
    slot, reference = _slot(model), Reference(model)
    ids = _ids(1000, 1)
    at = 0
    with torch.inference_mode():
        # the first pass is eager; then every bucket, exact or padded, across windows 256 to 1,024,
        # and on CUDA graphs replayed for a (bucket, window) seen before (the repeated 1s and 3s)
        for n in (100, 1, 1, 3, 3, 9, 23, 64, 128, 129, 200, 1, 1, 250, 5, 3, 3):
            chunk = ids[at:at + n]
            got = slot.forward(chunk, at, n)
            assert got.shape == (n, VOCAB)
            _close(got, reference.forward(chunk))
            at += n
        assert at > 900
        last = slot.forward(ids[at:at + 7], at, 1)  # rows=1: the last position only
        _close(last, reference.forward(ids[at:at + 7])[-1:])
    # (bucket, window): (1, 256) (4, 256) (16, 256) (32, 256) (64, 256) (128, 512) (1, 1024)
    # (8, 1024) (4, 1024) with every row, and the last pass's (8, 1024) with its last row only;
    # 129, 200 and 250 tokens run eagerly
    assert slot.graphs == (10 if model.device.type == "cuda" else 0)


def test_a_trim_is_where_the_next_pass_starts(model: Any) -> None:
    slot, reference = _slot(model), Reference(model)
    ids, detour = _ids(300, 2), _ids(40, 3)
    with torch.inference_mode():
        slot.forward(ids[:280], 0, 1)
        reference.forward(ids[:280])
        slot.forward(detour, 280, 1)  # written past 280, then abandoned: a trim moves no tensor
        reference.trim(250)
        _close(slot.forward(ids[250:300], 250, 50), reference.forward(ids[250:300]))


def test_refuses_what_does_not_fit(model: Any) -> None:
    slot = _slot(model, capacity=300)
    with torch.inference_mode():
        slot.forward(_ids(200, 4), 0, 1)
        with pytest.raises(ValueError, match="do not fit"):
            slot.forward(_ids(101, 5), 200, 1)
        with pytest.raises(ValueError, match="rows"):
            slot.forward(_ids(3, 6), 200, 4)
        # a pass whose bucket would overrun the cache runs unpadded instead
        reference = Reference(model)
        reference.forward(_ids(200, 4))
        tail = _ids(100, 7)  # bucket 128: 200 + 128 > 300
        _close(slot.forward(tail, 200, 100), reference.forward(tail))


def test_a_padded_pass_at_the_end_of_the_context_writes_into_the_margin(model: Any) -> None:
    """A slot holds n_ctx + the largest bucket: the padding of a pass ending at n_ctx fits."""
    n_ctx = 300
    slot, reference = _slot(model, capacity=n_ctx + max(BUCKETS)), Reference(model)
    ids = _ids(n_ctx, 8)
    with torch.inference_mode():
        _close(slot.forward(ids[:290], 0, 1), reference.forward(ids[:290])[-1:])
        _close(slot.forward(ids[290:], 290, 10), reference.forward(ids[290:]))  # bucket 16: up to 306
    assert slot.graphs == (1 if model.device.type == "cuda" else 0)  # padded (and captured), not eager


def test_only_full_attention_models_qualify(model: Any) -> None:
    """A sliding-window static layer is a ring buffer, which padding would write over."""

    def problem(config: object) -> str | None:
        return static_layout_problem(SimpleNamespace(config=config))

    assert static_layout_problem(model) is None
    assert "sliding_attention" in str(problem(Gemma3TextConfig(**SMALL, head_dim=16)))
    assert "sliding" in str(problem(MistralConfig(**SMALL, sliding_window=512)))


def test_buckets_and_windows() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 9, 23, 128)] == [1, 2, 4, 16, 32, 128]
    assert bucket_for(max(BUCKETS) + 1) is None
    assert [window_for(end, 4224) for end in (1, 256, 257, 1650, 4096, 4097)] == [256, 256, 512, 2048, 4096, 4224]
    assert window_for(300, 300) == 300
