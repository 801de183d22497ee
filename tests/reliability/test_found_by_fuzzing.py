"""Regression tests for the defects the reliability suite found (each failed before its fix)."""

from __future__ import annotations

import numpy as np
import pytest

from local_llm_kit import LLMClient
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.sampling import Sampler, SamplingParams
from local_llm_kit.testing import fake_client

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("temperature", [5e-324, 2.2250738585072014e-308, 1e-300])
def test_a_tiny_positive_temperature_samples_the_best_token_instead_of_failing_on_nan(temperature: float) -> None:
    # Found by fuzzing: logits / 1e-308 overflowed to inf, inf - inf is NaN, numpy refused the
    # probabilities with ValueError.
    logits = np.array([1.0, 5.0, 3.0, -np.inf], dtype=np.float32)
    for top_p in (0.0, 0.5, 1.0):
        assert Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=0)).sample(logits.copy()) == 1
    client = fake_client("Hello there!")
    reply = client.chat.completions.create(messages=HI, temperature=temperature, logit_bias={"72": 4.0})
    assert reply.choices[0].message.content == "Hello there!"


@pytest.mark.parametrize("model", [5, ["fake-model"], {"name": "x"}])
def test_a_model_that_is_not_a_string_is_refused_by_name(model: object) -> None:
    # Found by fuzzing: the model was resolved before it was validated, and a number reached
    # pathlib (TypeError: expected str, bytes or os.PathLike object, not int).
    client = fake_client()
    assert isinstance(client, LLMClient)
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=HI, model=model)  # type: ignore[arg-type]
    assert info.value.param == "model"
