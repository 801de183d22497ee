"""Incremental prompt encoding on the fake backend: same ids as a whole encode, cost of the new turn only."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from local_llm_kit import LLMClient, encoding, sealed
from local_llm_kit.engine import Engine
from local_llm_kit.testing import FakeBackend, fake_client


class CountingBackend(FakeBackend):
    """Records how many characters each tokenize call was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenized: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        self.tokenized.append(len(text))
        return super().tokenize(text)


def whole_encode(engine: Engine, messages: Sequence[dict[str, Any]]) -> list[int]:
    """What encode() gives with segmenting off and nothing memoized."""
    encoder = engine.encoder
    boundaries, segments, reuse = encoder._boundaries, dict(encoder._segments), encoder.prefix_reuse
    encoder._boundaries, encoder.prefix_reuse = (), False
    encoder._segments.clear()
    try:
        return engine.encode(messages)
    finally:
        encoder._boundaries, encoder.prefix_reuse = boundaries, reuse
        encoder._segments.update(segments)


def chat(client: LLMClient, turns: int) -> list[list[dict[str, Any]]]:
    """A conversation with memory on; returns the prompt (history + new message) of every turn."""
    client.enable_memory(max_tokens=100_000)
    prompts = []
    for i in range(turns):
        new = {"role": "user", "content": f"Question {i}: tell me more about item {i} <3 ünïcode."}
        prompts.append([*client.memory, new])
        client.chat.completions.create(messages=[new])
    return prompts


def test_incremental_ids_equal_a_whole_encode_over_a_conversation_with_memory() -> None:
    client = fake_client(lambda prompt: f"Reply {prompt.count('Question')}: fine.<|im_end|> trailing? no")
    engine = client.engine
    assert engine.encoder._boundaries  # the fake tokenizer's end-of-turn tokens
    prompts = chat(client, 12)
    for messages in prompts:
        assert engine.encode(messages) == whole_encode(engine, messages)
    assert engine.encoder._segment_checks == 0 and engine.encoder._boundaries  # every check passed, segmenting stays on


def test_a_warm_turn_tokenizes_only_what_is_new() -> None:
    backend = CountingBackend("A fairly long reply that becomes part of the history. " * 3)
    client = fake_client(backend=backend)
    chat(client, 10)  # past the first checks against whole tokenizations
    assert client.engine.encoder._segment_checks == 0
    history_chars = len(client.engine.render(client.memory))
    backend.tokenized.clear()
    client.chat.completions.create(messages=[{"role": "user", "content": "One more question."}])
    # the prompt and the memory's count after the reply: each only the new turn, not the history
    assert sum(backend.tokenized) < 200 < history_chars / 10


def test_a_tokenizer_that_breaks_segmenting_is_tokenized_whole(caplog: pytest.LogCaptureFixture) -> None:
    class StripsBeforeEndOfTurn(FakeBackend):
        def tokenize(self, text: str) -> list[int]:  # like an added token with lstrip=True
            ids = super().tokenize(text)
            out: list[int] = []
            for token in ids:
                if token == self.END_OF_TURN:
                    while out and out[-1] == ord(" "):
                        out.pop()
                out.append(token)
            return out

    client = fake_client(backend=StripsBeforeEndOfTurn("ok "))
    engine = client.engine
    messages = [{"role": "user", "content": "trailing space "}, {"role": "assistant", "content": "x "},
                {"role": "user", "content": "again "}]
    with caplog.at_level("WARNING"):
        ids = engine.encode(messages)
    assert ids == engine.backend.tokenize(engine.render(messages))
    assert engine.encoder._boundaries == () and "tokenizing whole" in caplog.text


# -- incremental rendering --------------------------------------------------------------------------

SMOL_LIKE = (  # SmolLM2's template shape: a default system message unless the first message is one
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LOOKS_BACK = (  # numbers every turn by how many user turns remain: earlier turns change each time
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}{% set ns = namespace(seen=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.seen = ns.seen + 1 %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + ' ' + ((users | length) - ns.seen) | string + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(("template", "architecture"), [
    (None, "gemma3"), (SMOL_LIKE, "fake"), (FakeBackend().info.chat_template, "fake"),
])
@pytest.mark.parametrize("system", [True, False])
def test_incremental_rendering_equals_whole_rendering(template: str | None, architecture: str,
                                                      system: bool) -> None:
    client = fake_client(backend=FakeBackend("Fine, thanks.  ", chat_template=template,
                                             architecture=architecture))
    engine = client.engine
    if system:
        client.enable_memory(max_tokens=100_000)
        client.add_to_memory([{"role": "system", "content": "Be brief."}])
    prompts = chat(client, 12)
    assert engine.encoder.incremental_render, "every check against a whole rendering passed"
    for messages in prompts:
        for generation_prompt in (True, False):
            assert engine.render(messages, add_generation_prompt=generation_prompt) == \
                engine.template.render(messages, add_generation_prompt=generation_prompt)
        assert engine.encode(messages) == whole_encode(engine, messages)


INDEXED = (  # numbers every message by its position: a part rendered apart gets other numbers
    "{% for message in messages %}{{ '<|im_start|>' + loop.index0 | string + ' ' + message['role'] + '\n'"
    " + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_is_rendered_whole() -> None:
    client = fake_client(backend=FakeBackend("ok", chat_template=LOOKS_BACK))
    engine = client.engine
    for messages in chat(client, 5):  # the opening renders differently alone: never cut
        assert engine.render(messages) == engine.template.render(messages)
        assert engine.encode(messages) == whole_encode(engine, messages)


def test_a_template_that_numbers_messages_is_rendered_whole(caplog: pytest.LogCaptureFixture) -> None:
    client = fake_client(backend=FakeBackend("ok", chat_template=INDEXED))
    engine = client.engine
    with caplog.at_level("WARNING"):
        prompts = chat(client, 4)
    assert not engine.encoder.incremental_render and "rendering whole" in caplog.text
    for messages in prompts:
        assert engine.render(messages) == engine.template.render(messages)


def record_renders(engine: Engine) -> list[list[Any]]:
    """From now on, every conversation (or part) the template renders, in order."""
    rendered: list[list[Any]] = []
    inner = engine.template.render

    def recording(messages: Sequence[Any], **kwargs: Any) -> str:
        rendered.append(list(messages))
        return inner(messages, **kwargs)

    engine.template.render = recording  # type: ignore[method-assign]
    return rendered


def test_a_warm_turn_renders_only_the_opening_and_the_new_messages() -> None:
    client = fake_client("A reply.")
    engine = client.engine
    chat(client, 12)  # past the checks against whole renderings
    assert engine.encoder._render_checks == 0 and engine.encoder.incremental_render
    recorded = record_renders(engine)
    client.chat.completions.create(messages=[{"role": "user", "content": "One more."}])
    rendered = [len(messages) for messages in recorded]
    # The opening, a few known messages and the new ones; and one part each for the prompt
    # and for the memory's count after the reply (each starts where the one before ended, and
    # the reply is found after its own prompt's text, with no marked rendering).
    assert rendered and max(rendered) <= 2 + encoding._PART_LOOKBACK + 2 < len(client.memory)
    assert len(rendered) <= 3


def test_parts_start_again_from_the_last_known_message_once_they_grow_past_the_lookback() -> None:
    client = fake_client("A reply.")
    engine = client.engine
    chat(client, 4)
    recorded = record_renders(engine)
    turns = 2 * encoding._PART_LOOKBACK
    chat(client, turns)
    rendered = [len(messages) for messages in recorded]
    assert max(rendered) <= 2 + encoding._PART_LOOKBACK + 2
    # Two parts a turn (the prompt's, the count's), and a head again each time parts grew too long.
    assert 2 * turns < len(rendered) < 3 * turns


# -- encoded prefixes ---------------------------------------------------------------------------------

def segments_walked(client: LLMClient, message: dict[str, Any]) -> int:
    """How many prompt segments one request (prompt and the memory's count after it) went through."""
    encoder = client.engine.encoder
    walked: list[int] = []
    inner = encoder._tokenize_segments

    def counting(text: str) -> list[tuple[str, tuple[int, ...]]]:
        result = inner(text)
        walked.append(len(result))
        return result

    encoder._tokenize_segments = counting  # type: ignore[method-assign]
    try:
        client.chat.completions.create(messages=[message])
    finally:
        del encoder._tokenize_segments
    return sum(walked)


def test_a_warm_turn_walks_the_same_segments_at_ten_and_forty_turns() -> None:
    client = fake_client(backend=FakeBackend("A reply that joins the history.", n_ctx=32_768))
    chat(client, 10)
    assert client.engine.encoder._prefix_checks == 0 and client.engine.encoder.prefix_reuse
    at_ten = segments_walked(client, {"role": "user", "content": "Question at ten."})
    chat(client, 30)
    at_forty = segments_walked(client, {"role": "user", "content": "Question at forty."})
    assert at_ten == at_forty <= 6
    assert len(client.memory) > 70


def test_a_warm_turn_snapshots_its_new_messages_and_not_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    client = fake_client(backend=FakeBackend("A reply that joins the history.", n_ctx=32_768))
    chat(client, 40)
    taken: list[str] = []
    take = sealed._take

    def counting(message: Mapping[str, Any]) -> sealed.Snapshot:
        taken.append(message["content"])
        return take(message)

    monkeypatch.setattr(sealed, "_take", counting)
    client.chat.completions.create(messages=[{"role": "user", "content": "Question at forty."}])
    assert len(client.memory) > 80
    # the new message (in the prompt, then sealed into memory) and the reply (sealed): the
    # history's snapshots were taken when it was remembered, and the count after the reply takes none
    assert sorted(taken) == ["A reply that joins the history.", "Question at forty.", "Question at forty."]


def test_prefixed_ids_equal_a_whole_encode_with_tools_and_a_reply_repeated_in_a_question() -> None:
    tool = {"type": "function", "function": {"name": "look_up", "description": "Look a word up.",
                                             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    client = fake_client("Paris")
    engine = client.engine
    client.enable_memory(max_tokens=100_000)
    prompts = []
    for i in range(12):  # the reply's text also appears in the next questions, before the reply
        new = {"role": "user", "content": f"Paris? Paris! ({i})"}
        prompts.append([*client.memory, new])
        client.chat.completions.create(messages=[new], tools=[tool], tool_choice="none")
    for messages in prompts:
        assert engine.encode(messages, tools=[tool]) == whole_encode_with_tools(engine, messages, [tool])
    assert engine.encoder.prefix_reuse


def whole_encode_with_tools(engine: Engine, messages: Sequence[dict[str, Any]],
                            tools: list[dict[str, Any]]) -> list[int]:
    encoder = engine.encoder
    encoder.prefix_reuse = False
    try:
        return engine.encode(messages, tools=tools)
    finally:
        encoder.prefix_reuse = True


def test_a_prefix_that_disagrees_with_a_whole_encode_turns_prefixes_off(caplog: pytest.LogCaptureFixture) -> None:
    client = fake_client("Fine.")
    encoder = client.engine.encoder
    prompts = chat(client, 3)
    messages = [*client.memory, {"role": "user", "content": "Next."}]
    expected = whole_encode(client.engine, messages)
    for key, prefix in list(encoder._prefixes.items()):  # as if a memoized prefix had gone stale
        encoder._prefixes[key] = type(prefix)(prefix.text, [0, *prefix.ids[1:]])
    assert encoder._prefix_checks > 0
    with caplog.at_level("WARNING"):
        assert client.engine.encode(messages) == expected
    assert not encoder.prefix_reuse and "encoding whole from now on" in caplog.text
    assert all(client.engine.encode(m) == whole_encode(client.engine, m) for m in prompts)


def test_a_conversation_edited_in_place_is_encoded_as_it_now_reads() -> None:
    # The memos know conversations by value, not by the identity of their message dicts: a
    # caller who edits a message it sent before (in place, or in a copy) gets the edited prompt,
    # also past the first checks, when the shortcuts are no longer compared with a whole encode.
    client = fake_client("Noted.")
    engine = client.engine
    prompts = chat(client, 12)
    assert engine.encoder._prefix_checks == 0 and engine.encoder._render_checks == 0
    messages = [*prompts[-1]]
    engine.encode(messages)
    messages[3]["content"] = "An earlier question, edited afterwards."
    messages.append({"role": "user", "content": "And now?"})
    ids = engine.encode(messages)
    assert ids == whole_encode(engine, messages)
    assert "edited afterwards" in engine.render(messages)
    swapped = [*messages[:-1], {"role": "assistant", "content": "Noted."}, messages[-1]]
    assert engine.encode(swapped) == whole_encode(engine, swapped)


class MergesBraces(FakeBackend):
    """A byte-level tokenizer with one merge, "{}" -> one token: a text with two tokenizations."""

    BRACES = 256 + 32  # past the byte and special ids

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._info = dataclasses.replace(self._info, n_vocab=self.BRACES + 1)

    def tokenize(self, text: str) -> list[int]:
        out: list[int] = []
        for token in super().tokenize(text):
            if token == ord("}") and out and out[-1] == ord("{"):
                out[-1] = self.BRACES
            else:
                out.append(token)
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return b"{}" if token_id == self.BRACES else super().token_bytes(token_id)


def test_a_generated_reply_keeps_its_ids_only_where_it_was_generated() -> None:
    # The same reply text generated as other ids in two conversations (say "{}" under a JSON
    # grammar, which emits "{" and "}", and as free text, which emits the merged token): each
    # conversation is encoded with its own reply's ids, whichever was generated last, the same
    # way from a memoized prefix and whole; where nobody generated the text it is tokenized.
    client = fake_client(backend=MergesBraces("ok"))
    engine = client.engine
    split, merged = [ord("{"), ord("}")], [MergesBraces.BRACES]
    asked = [[{"role": "user", "content": f"Question {i}"}] for i in range(3)]
    conversations = [[*a, {"role": "assistant", "content": "{}"}, {"role": "user", "content": "And?"}] for a in asked]
    for question, conversation, generated in zip(asked, conversations, (split, merged), strict=False):
        engine.remember_generation(engine.encode_prompt(question)[1], "{}", generated)
        engine.encode(conversation[:2], add_generation_prompt=False)  # memoizes its prefix
    engine.remember_generation(engine.encode_prompt(asked[0])[1], "{}", split)  # the last reply generated: "{}" split
    for conversation, reply_ids in zip(conversations, (split, merged, merged), strict=True):  # the third: typed
        before = engine.backend.tokenize(engine.render(conversation[:1]))
        for ids in (engine.encode(conversation), whole_encode(engine, conversation)):
            assert ids[:len(before)] == before
            assert ids[len(before):len(before) + len(reply_ids) + 1] == [*reply_ids, MergesBraces.END_OF_TURN]
    assert engine.encoder.prefix_reuse


# -- parts and generation prompts ---------------------------------------------------------------------

THINKS_ON_REQUEST = (  # the generation prompt opens a thought when the last message asks for one
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if '/think' in messages[-1]['content'] %}{{ '<think>\n' }}{% endif %}{% endif %}"
)


def test_a_generation_prompt_that_depends_on_the_turn_is_rendered_every_time(caplog: pytest.LogCaptureFixture) -> None:
    client = fake_client(backend=FakeBackend("ok", chat_template=THINKS_ON_REQUEST))
    engine = client.engine
    client.enable_memory(max_tokens=100_000)
    prompts = []
    with caplog.at_level("WARNING"):
        for i in range(12):
            new = {"role": "user", "content": f"Question {i}" + (" /think" if i % 3 == 2 else "")}
            prompts.append([*client.memory, new])
            client.chat.completions.create(messages=[new])
    assert not engine.encoder.generation_prompt_reuse and "generation prompt" in caplog.text
    for messages in prompts:
        assert engine.render(messages) == engine.template.render(messages)
        assert engine.encode(messages) == whole_encode(engine, messages)


def test_a_warm_turn_renders_each_part_once() -> None:
    # The prompt renders its new part once (the generation prompt is known); the memory's count
    # after the reply starts from that part, renders one more, and finds the reply after its own
    # prompt's text, without rendering a reply-marked conversation.
    client = fake_client("A reply.")
    engine = client.engine
    chat(client, 12)
    assert engine.encoder._render_checks == 0 and engine.encoder._generation_prompt_checks <= 0
    rendered = record_renders(engine)
    client.chat.completions.create(messages=[{"role": "user", "content": "One more, never seen."}])
    assert 2 <= len(rendered) <= 3, [len(r) for r in rendered]  # a head again where parts grew too long
    assert not any("llk-reply" in str(m.get("content")) for messages in rendered for m in messages)
    prompt_part, count_part = rendered[-2:]
    assert count_part[:-1] == prompt_part and count_part[-1] == {"role": "assistant", "content": "A reply."}


# -- replies found after their own prompts -------------------------------------------------------------

def marker_encode(engine: Engine, messages: Sequence[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What a whole encode gives when replies are found by rendering markers only."""
    with monkeypatch.context() as patched:
        patched.setattr(encoding, "_anchored_pieces", lambda *args: None)
        return whole_encode(engine, messages)


def test_a_reply_found_after_its_prompt_is_spliced_where_markers_put_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Replies whose text also occurs elsewhere (in questions, in other replies): found after
    # the prompt each was generated for, they get the same ids, at the same places, as the
    # marker search gives, and those are the ids the model generated.
    replies = ["{}", "Paris", "{} and Paris", "{}", "Paris {}"]
    client = fake_client(backend=MergesBraces(lambda prompt: replies[prompt.count("Say") % len(replies)]))
    engine = client.engine
    client.enable_memory(max_tokens=100_000)
    prompts = []
    for i in range(12):
        new = {"role": "user", "content": f"Say {{}} or Paris, {i}"}
        prompts.append([*client.memory, new])
        client.chat.completions.create(messages=[new])
    anchored_splits = 0
    real = encoding._anchored_pieces

    def counting(*args: Any) -> list[str] | None:
        nonlocal anchored_splits
        pieces = real(*args)
        anchored_splits += pieces is not None
        return pieces

    monkeypatch.setattr(encoding, "_anchored_pieces", counting)
    for messages in prompts[1:]:
        by_anchor = whole_encode(engine, messages)
        assert by_anchor == engine.encode(messages) == marker_encode(engine, messages, monkeypatch)
    assert anchored_splits >= len(prompts) - 1


REWRITES_EARLIER_REPLIES = (  # earlier replies lose their thoughts; the last one is kept whole
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ message['content'].split('</think>')[-1] }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_rewrites_earlier_replies_is_split_by_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rewritten reply does not follow its prompt's text: it is found by its marker, where the
    # template keeps it whole, and tokenized where the template rewrote it; every way agrees.
    client = fake_client(backend=FakeBackend("<think>hm</think>Yes.", chat_template=REWRITES_EARLIER_REPLIES))
    engine = client.engine
    client.enable_memory(max_tokens=100_000)
    for i in range(4):
        client.chat.completions.create(messages=[{"role": "user", "content": f"Question {i}"}])
    messages = client.memory
    assert engine.render(messages).count("<think>hm</think>") == 1  # the last reply only
    assert engine.encode(messages) == whole_encode(engine, messages) == marker_encode(engine, messages, monkeypatch)
    assert engine.encoder.prefix_reuse and engine.encoder.incremental_render
