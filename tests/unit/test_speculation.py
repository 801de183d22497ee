"""Prompt-lookup speculative decoding: drafts, verification, and output identical to plain decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.backends.base import Backend
from local_llm_kit.decoding import Finished, GenerationSettings, _Verified, generate
from local_llm_kit.sampling import SamplingParams
from local_llm_kit.speculation import DEFAULT_DRAFT_TOKENS, PassCosts, PromptLookup, draft_tokens
from local_llm_kit.testing import FakeBackend, FixedPassCosts, fake_client

PASSAGE = ("The lighthouse at Cape Wrath was built in 1828 by Robert Stevenson. Its keepers left in 1998, "
           "when the light was automated.")
ASK = [{"role": "user", "content": f"Quote this passage exactly: {PASSAGE}"}]


@pytest.fixture(autouse=True)
def _machine_independent_pass_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines built here judge drafts by a fixed pass cost, not this machine's timings, so that
    verification runs in every test (the decision itself is tested apart, below)."""
    monkeypatch.setattr("local_llm_kit.engine.PassCosts", FixedPassCosts)


def copying_backend(**kwargs: Any) -> FakeBackend:
    return FakeBackend(reply=f"Here it is: {PASSAGE}", **kwargs)


def run(client: Any, **params: Any) -> tuple[str, list[str]]:
    reply = client.chat.completions.create(messages=ASK, **params)
    streamed = [c.choices[0].delta.content or "" for c in
                client.chat.completions.create(messages=ASK, stream=True, **params) if c.choices]
    return reply.choices[0].message.content, streamed


# -- drafting ----------------------------------------------------------------------------------------
def test_a_continuation_follows_the_longest_match_of_the_sequence_end() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2], max_tokens=8)
    assert lookup.continuation(6) == [3, 7, 8, 6, 1, 2]  # the latest "1 2" was followed by 3 7 8 6 1 2
    lookup.extend([3])
    assert lookup.continuation(2) == [7, 8]
    # "9 1 2 3" occurs once, earlier than the latest "1 2 3": the longer match wins.
    lookup = PromptLookup([9, 1, 2, 3, 4, 5, 1, 2, 3, 6, 9, 1, 2, 3], max_tokens=8)
    assert lookup.continuation(3) == [4, 5, 1]


def test_a_copy_that_runs_into_the_present_goes_on_copying_its_own_guess() -> None:
    # "_20 23" repeating: the latest earlier "_20 23 _20" ends two tokens back, so what followed
    # it is the text's own end, and then what the draft has just guessed.
    lookup = PromptLookup([40, 41, 9, 20, 23, 20, 23, 20, 23], max_tokens=8)
    assert lookup.continuation(7) == [20, 23, 20, 23, 20, 23, 20]
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2], max_tokens=8)
    assert lookup.continuation(8) == [3, 7, 8, 6, 1, 2, 3, 7]  # period 6: "1 2 3 7 8 6" again
    lookup = PromptLookup([7, 7, 7], max_tokens=8)
    assert lookup.continuation(4) == [7, 7, 7, 7]


def test_no_draft_without_a_repeated_ngram_or_room() -> None:
    assert PromptLookup([1, 2, 3, 4, 5]).draft(8) == []
    assert PromptLookup([1, 2, 3, 1, 2]).draft(0) == []
    # One repeated token is not enough: single-token matches are mostly wrong in free text.
    assert PromptLookup([5, 1, 7, 8, 1]).draft(8) == []


def copy_prompt() -> list[int]:
    return list(range(50)) + list(range(10))  # "0 1 ... 9" again: the continuation is 10 11 12 ...


def phrase_prompt() -> list[int]:
    return [5, 6, 7, 1, 2, *range(10, 30), 8, 1, 2]  # only "1 2" recurs: a short match


def test_where_extra_positions_are_nearly_free_drafts_run_to_the_cap() -> None:
    lookup = PromptLookup(copy_prompt(), max_tokens=8, costs=FixedPassCosts(extra_share=0.02))
    assert lookup.draft(100) == list(range(10, 18))
    assert len(lookup.draft(5)) == 5  # never past the room left
    short = PromptLookup(phrase_prompt(), max_tokens=8, costs=FixedPassCosts(extra_share=0.02))
    assert short.draft(100) == list(range(10, 14))  # an acceptance of one half still pays for 4


def test_where_extra_positions_are_dear_only_a_long_match_is_verified_at_first() -> None:
    costs = FixedPassCosts(extra_share=0.45)
    assert PromptLookup(phrase_prompt(), max_tokens=8, costs=costs).draft(100) == []
    assert PromptLookup(copy_prompt(), max_tokens=8, costs=costs).draft(100) == [10, 11]


def test_acceptance_is_learned_from_drafts() -> None:
    lookup = PromptLookup(copy_prompt(), max_tokens=8, costs=FixedPassCosts(extra_share=0.45))
    sequence = 10
    for _ in range(4):  # each accepted draft raises the estimate, and the next draft is longer
        draft = lookup.draft(100)
        assert draft and draft[0] == sequence
        lookup.feedback(len(draft), len(draft))
        lookup.extend([*draft, sequence + len(draft)])
        sequence += len(draft) + 1
    assert len(lookup.draft(100)) >= 4 and lookup.acceptance > 0.9
    for _ in range(8):
        lookup.feedback(4, 0)
    assert lookup.draft(100) == []  # rejected again and again: back to plain decoding


def test_a_declined_guess_is_still_checked_against_the_token_chosen() -> None:
    lookup = PromptLookup(phrase_prompt(), max_tokens=8, costs=FixedPassCosts(extra_share=0.45))
    declined = 0
    while not lookup.draft(100):
        declined += 1
        assert declined <= 6, "right guesses never made a draft worth verifying"
        lookup.extend([10])  # the guess was right ...
        lookup.extend([100 + declined, 8, 1, 2])  # ... and the sequence ends in a short match again
    assert declined >= 1 and lookup.draft(100)[0] == 10


def test_acceptance_of_short_matches_does_not_hold_back_long_ones() -> None:
    copied = [*range(40, 60), *range(50, 59)]  # ends in a match of 9 tokens
    assert PromptLookup(copied, max_tokens=8, costs=FixedPassCosts(extra_share=0.45)).draft(100) == [59, 50]
    lookup = PromptLookup(phrase_prompt(), max_tokens=8, costs=FixedPassCosts(extra_share=0.45))
    for i in range(6):
        assert lookup.draft(100) == []
        lookup.extend([200 + i, 8, 1, 2])  # each short-match guess was wrong
    lookup.extend(copied)
    assert lookup.draft(100) == [59, 50]  # its own class's estimate: still the prior


def test_pass_costs_learn_the_share_of_an_extra_position() -> None:
    costs = PassCosts()
    assert costs.extra_share == PassCosts.PRIOR_EXTRA  # nothing timed yet
    for _ in range(50):
        costs.record(1, 0.010)
        costs.record(9, 0.010 + 8 * 0.004)
    assert costs.extra_share == pytest.approx(0.4, rel=0.02)


def test_pass_costs_are_learned_per_pass_size() -> None:
    costs = PassCosts()
    assert costs.shares(3) == pytest.approx([1.0, 1.25, 1.5])  # nothing timed: the prior
    costs.record(1, 0.010)
    costs.record(2, 0.019)  # a concave curve, as llama.cpp's on a small CPU: the second position
    costs.record(9, 0.041)  # is dear, each one after it cheap
    shares = costs.shares(12)
    assert shares[1] == pytest.approx(1.9)
    assert shares[4] == pytest.approx(1.9 + (4.1 - 1.9) * 3 / 7)  # 5 positions: between 2 and 9
    assert shares[8] == pytest.approx(4.1)
    assert shares[11] == pytest.approx(4.1 + 3 * PassCosts.PRIOR_EXTRA)  # past what was timed: optimistic
    tiled = PassCosts()  # Gemma 3 on llama.cpp, every row: 7 positions dear, 8 cheap (kernel tiles)
    for positions, seconds in ((1, 0.011), (7, 0.048), (8, 0.034)):
        tiled.record(positions, seconds)
    shares = tiled.shares(10)
    assert shares[6] == pytest.approx(48 / 11) and shares[7] == pytest.approx(34 / 11)  # as timed
    assert shares[9] == pytest.approx(34 / 11)  # past a timed drop, never a falling extrapolation
    flat = PassCosts()  # a GPU's curve, or transformers' on a CPU: extra positions nearly free
    for positions, seconds in ((1, 0.0350), (4, 0.0385), (5, 0.0392)):
        flat.record(positions, seconds)
    assert flat.shares(9)[8] == pytest.approx(1.12 + 4 * 0.02)  # past 5: the slope from 4 to 5, not the prior


def test_pass_costs_learn_what_a_row_of_logits_costs_apart_from_its_position() -> None:
    costs = PassCosts()
    costs.record(1, 0.010)
    costs.record(4, 0.038)  # every row: a large output layer, as Gemma 3's on a CPU
    assert costs.cost(4, 2) == pytest.approx(3.8)  # no pass returning fewer rows timed yet
    costs.record(4, 0.014, rows=1)  # a forced run of 4: one row
    assert costs.cost(4, 1) == pytest.approx(1.4)
    assert costs.cost(4, 4) == pytest.approx(3.8)
    assert costs.cost(4, 2) == pytest.approx(1.4 + 2.4 / 3)  # in proportion, until a row's cost is learned
    assert costs.cost(6, 1) == pytest.approx(1.4 + 2 * (0.4 / 3))  # the one-row curve's own slope past 4
    for _ in range(60):
        costs.record(4, 0.030, rows=2)
    assert costs.cost(4, 2) == pytest.approx(3.0, rel=0.01)  # a row beyond the first: 1.6 steps
    assert costs.cost(4, 3) == pytest.approx(3.8)  # never above a pass of every row
    with pytest.raises(ValueError, match="1 to 4 rows"):
        costs.record(4, 0.01, rows=5)


def _gemma_like_costs(two_rows_of_four: float) -> PassCosts:
    costs = PassCosts()
    costs.record(1, 0.011)
    for positions, seconds in ((2, 0.013), (3, 0.015), (4, 0.016)):
        costs.record(positions, seconds, rows=1)
    for _ in range(60):
        costs.record(4, two_rows_of_four, rows=2)
    return costs


def test_a_forced_run_in_a_draft_is_no_gain_and_its_rows_are_what_it_costs() -> None:
    # The value's closing quote is sampled, then the grammar forces the next key: plain decoding
    # takes a step for the quote and one pass for the quote and the key together.
    outputs = [True, False, False, True]
    guess_key = PromptLookup(copy_prompt(), max_tokens=3, costs=_gemma_like_costs(0.027))
    assert guess_key.plan(100, outputs_of=lambda draft: outputs) == ([], [True])  # 27 ms against 11 + 15
    assert guess_key.continuation(3) == [10, 11, 12]
    cheap_rows = PromptLookup(copy_prompt(), max_tokens=3, costs=_gemma_like_costs(0.012))
    assert cheap_rows.plan(100, outputs_of=lambda draft: outputs) == ([10, 11, 12], outputs)


def test_a_draft_ends_before_a_sampled_token_not_inside_a_forced_run() -> None:
    outputs = [True, True, False, False, True, False]
    for share in (0.0, 0.1, 0.3):
        lookup = PromptLookup(copy_prompt(), max_tokens=5, costs=FixedPassCosts(extra_share=share))
        draft, rows = lookup.plan(100, outputs_of=lambda draft: outputs)
        assert len(draft) in (0, 1, 4) and rows == outputs[:len(draft) + 1]


@pytest.mark.parametrize(("value", "expected"), [(True, DEFAULT_DRAFT_TOKENS), (False, 0), (0, 0), (5, 5)])
def test_prompt_lookup_values(value: object, expected: int) -> None:
    assert draft_tokens(value) == expected


@pytest.mark.parametrize("value", [-1, 65, 2.5, "yes"])
def test_a_bad_prompt_lookup_is_refused_by_name(value: object) -> None:
    client = fake_client("hi")
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=ASK, prompt_lookup=value)  # type: ignore[arg-type]
    assert info.value.param == "prompt_lookup"
    with pytest.raises(InvalidRequestError) as info:
        LLMClient("fake-model", prompt_lookup=value)  # type: ignore[arg-type]
    assert info.value.param == "prompt_lookup"


def test_prompt_lookup_is_refused_for_a_remote_backend() -> None:
    with pytest.raises(InvalidRequestError) as info:
        LLMClient("m", backend="openai", base_url="http://127.0.0.1:9/v1", prompt_lookup=True)
    assert info.value.param == "prompt_lookup"


class _OnePositionBackend(FakeBackend):
    """An engine that only returns the last position's logits (no ``forward_all``)."""

    forward_all = Backend.forward_all  # the contract's own: not implemented


def test_a_backend_that_cannot_verify_drafts_refuses_prompt_lookup() -> None:
    backend = _OnePositionBackend(reply="hi")
    assert not backend.verifies_drafts
    client = fake_client(backend=backend)
    with pytest.raises(InvalidRequestError, match="prompt_lookup") as info:
        client.chat.completions.create(messages=ASK, prompt_lookup=True)
    assert info.value.param == "prompt_lookup"
    assert client.chat.completions.create(messages=ASK).choices[0].message.content == "hi"


# -- verification --------------------------------------------------------------------------------------
def test_greedy_output_is_identical_with_fewer_forward_passes() -> None:
    plain_backend, fast_backend = copying_backend(), copying_backend()
    plain = run(fake_client(backend=plain_backend, temperature=0))
    fast = run(fake_client(backend=fast_backend, temperature=0, prompt_lookup=True))
    assert fast == plain
    assert plain[0] == f"Here it is: {PASSAGE}"
    # Every forward pass of the plain run evaluates one token after the prefill; the copying run
    # verifies drafts, so it needs far fewer passes for the same reply.
    assert len(fast_backend.forward_calls) < len(plain_backend.forward_calls) / 3
    assert max(fast_backend.forward_calls[1:]) > 1


def test_the_client_setting_is_the_default_and_a_request_overrides_it() -> None:
    backend = copying_backend()
    client = fake_client(backend=backend, temperature=0, prompt_lookup=True)
    client.chat.completions.create(messages=ASK, prompt_lookup=False)
    assert set(backend.forward_calls[1:]) == {1}
    backend.forward_calls.clear()
    client.chat.completions.create(messages=ASK)
    assert max(backend.forward_calls[1:]) > 1


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampling_with_a_seed_gives_the_same_tokens(seed: int) -> None:
    # The fake model gives its scripted token about a third of the probability at temperature 2:
    # replies wander off the script, and speculation must follow them token for token.
    params = {"temperature": 2.0, "top_p": 1.0, "seed": seed, "max_tokens": 80}
    plain = fake_client(backend=copying_backend()).chat.completions.create(messages=ASK, **params)
    fast = fake_client(backend=copying_backend()).chat.completions.create(messages=ASK, prompt_lookup=4, **params)
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.usage == plain.usage


@pytest.mark.parametrize("params", [
    {"max_tokens": 30}, {"stop": ["Stevenson"]}, {"logprobs": True, "top_logprobs": 2},
    {"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"n": 2, "seed": 3, "temperature": 1.0},
])
def test_budget_stops_logprobs_and_penalties_are_unchanged(params: dict[str, Any]) -> None:
    plain = fake_client(backend=copying_backend(), temperature=0).chat.completions.create(messages=ASK, **params)
    fast = fake_client(backend=copying_backend(), temperature=0, prompt_lookup=True).chat.completions.create(
        messages=ASK, **params)
    assert fast.model_dump(exclude={"id", "created"}) == plain.model_dump(exclude={"id", "created"})


@pytest.mark.parametrize("seed", [0, 5])
def test_rejected_draft_tokens_leave_the_kv_cache(seed: int) -> None:
    backend = copying_backend()
    prompt = backend.tokenize(_render(backend, ASK))
    settings = GenerationSettings(max_tokens=120, sampling=SamplingParams(temperature=2.0, top_p=1.0, seed=seed),
                                  draft_tokens=6)
    steps = list(generate(backend, prompt, settings, pass_costs=FixedPassCosts()))
    finished = steps[-1]
    assert isinstance(finished, Finished)
    sequence = [*prompt, *finished.token_ids]
    cached = list(backend.cached_tokens)
    # Every cached token is the sequence's (the last sampled token is never evaluated), so the
    # next turn can reuse the whole prefix; drafts that were rejected were trimmed away.
    checked = min(len(cached), len(sequence) - 1)
    assert checked >= len(sequence) - 1
    assert cached[:checked] == sequence[:checked]
    assert backend.forward_calls.count(1) < len(backend.forward_calls)  # drafts were verified


def _render(backend: FakeBackend, messages: Sequence[dict[str, Any]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def test_json_schema_output_is_identical_and_drafts_stay_inside_the_grammar() -> None:
    schema = {"type": "object", "properties": {"quote": {"type": "string"}}, "required": ["quote"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": schema}}
    reply = f'{{"quote": "{PASSAGE}"}}'
    plain = fake_client(reply, temperature=0).chat.completions.create(messages=ASK, response_format=fmt)
    backend = FakeBackend(reply=reply)
    fast = fake_client(backend=backend, temperature=0, prompt_lookup=True).chat.completions.create(
        messages=ASK, response_format=fmt)
    assert fast.choices[0].message.content == plain.choices[0].message.content == reply
    assert max(backend.forward_calls[1:]) > 1


def test_verified_rows_are_the_logits_a_plain_pass_gives() -> None:
    backend = copying_backend()
    prompt = backend.tokenize(_render(backend, ASK)) + list(b"Here it")
    backend.forward(prompt)
    rows = backend.forward_all(list(b" is: The"))
    backend.truncate_cache(len(prompt))
    for i, token in enumerate(b" is: The"):
        expected = backend.forward([token])
        np.testing.assert_array_equal(rows[i], expected)


class _RecordingCosts(FixedPassCosts):
    def __init__(self) -> None:
        super().__init__(extra_share=0.0)
        self.timed: list[tuple[int, int | None]] = []

    def record(self, positions: int, seconds: float, rows: int | None = None) -> None:
        self.timed.append((positions, rows))


class _PassLog(FakeBackend):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.passes: list[tuple[str, int]] = []
        self.outputs: list[tuple[int, int]] = []  # (positions, rows computed) of each verification

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self.passes.append(("last row", len(tokens)))
        return super().forward(tokens)

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        self.passes.append(("all rows", len(tokens)))
        self.outputs.append((len(tokens), len(tokens) if rows is None else len(rows)))
        return super().forward_all(tokens, rows)


def test_the_cost_model_times_every_pass_with_the_rows_it_returned() -> None:
    # A pass of forced tokens returns only its last row, a verification the rows where the next
    # token is sampled: timing either as a pass of every row would misjudge drafts of that size.
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "quote": {"type": "string"}},
              "required": ["name", "quote"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": schema}}
    backend = _PassLog(reply=f'{{"name": "Stevenson", "quote": "{PASSAGE}"}}')
    client = fake_client(backend=backend, temperature=0, prompt_lookup=True)
    client.engine.pass_costs = costs = _RecordingCosts()
    client.chat.completions.create(messages=ASK, response_format=fmt)
    in_loop = backend.passes[1:]  # after the prefill
    assert ("all rows", 1) not in in_loop
    assert any(kind == "last row" and n > 1 for kind, n in in_loop), "no pass of forced tokens ran"
    assert any(kind == "all rows" for kind, n in in_loop), "no draft was verified"
    verifications = iter(backend.outputs)
    assert costs.timed == [next(verifications) if kind == "all rows" else (n, 1) for kind, n in in_loop]


JSON_REPLY = f'{{"name": "Stevenson", "quote": "{PASSAGE}", "keeper": "Stevenson", "built": "1828"}}'
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "q", "schema": {
    "type": "object", "properties": {k: {"type": "string"} for k in ("name", "quote", "keeper", "built")},
    "required": ["name", "quote", "keeper", "built"], "additionalProperties": False}}}


def test_verification_skips_the_logits_of_positions_the_grammar_forces() -> None:
    backend = _PassLog(reply=JSON_REPLY)
    client = fake_client(backend=backend, temperature=0, prompt_lookup=True)
    client.engine.pass_costs = FixedPassCosts(extra_share=0.0)
    fast = client.chat.completions.create(messages=ASK, response_format=JSON_FORMAT)
    assert fast.choices[0].message.content == JSON_REPLY
    assert backend.outputs, "no draft was verified"
    assert any(rows < positions for positions, rows in backend.outputs), "every position's logits were computed"


@pytest.mark.parametrize("max_tokens", [52, 58, 67, 80, 96, 121, 150])
def test_json_under_any_budget_is_the_same_with_skipped_logits(max_tokens: int) -> None:
    plain = fake_client(JSON_REPLY, temperature=0).chat.completions.create(
        messages=ASK, response_format=JSON_FORMAT, max_tokens=max_tokens)
    client = fake_client(backend=FakeBackend(reply=JSON_REPLY), temperature=0, prompt_lookup=True)
    client.engine.pass_costs = FixedPassCosts(extra_share=0.0)
    fast = client.chat.completions.create(messages=ASK, response_format=JSON_FORMAT, max_tokens=max_tokens)
    assert fast.model_dump(exclude={"id", "created"}) == plain.model_dump(exclude={"id", "created"})


def test_a_step_ending_where_logits_were_skipped_evaluates_its_last_token_again() -> None:
    # A forced run cut short (by the budget, as a last resort) can end a step on a drafted
    # position whose logits were skipped; that token must be fed again, not trusted.
    verified = _Verified()
    after = [np.full(4, float(i)) for i in range(4)]
    verified.hold([7, 8, 9, 10], [after[0], None, None, after[3]])
    pending, logits = verified.take([7, 8, 9, 10])
    assert pending == [] and logits is after[3]  # a whole forced run: its end has logits
    verified.hold([7, 8, 9, 10], [after[0], None, None, after[3]])
    pending, logits = verified.take([7, 8])  # the run was cut after 8
    assert (pending, logits) == ([8], None) and verified.tokens == [8, 9, 10]  # 8 is trimmed and fed again
    assert verified.kept == 1
