"""Prompt encoding: a conversation rendered with its chat template and tokenized, paying only for what is new.

A warm turn differs from the previous prompt of its conversation by a few messages. Three memos
make the cost of encoding it follow those messages, not the history:

- renderings (:meth:`PromptEncoder.render`): the text of recent conversations, so that only the
  new messages go through the template (with the opening and the last known messages, which
  templates look at); the parts rendered so are kept too, and the next part starts where a kept
  one does, as is the generation prompt each opening and last role gets, so that a warm turn
  renders one part for its prompt and one for the memory's count after its reply;
- segments (:meth:`PromptEncoder._tokenize`): the ids of each piece of text between end-of-turn
  tokens, so that a turn is tokenized once;
- encoded prefixes (:meth:`PromptEncoder.encode`): the ids of recent conversations up to their
  last safe cut (an end-of-turn token, or the end of a generated reply), so that a warm turn
  neither walks the history's segments nor splices its replies again.

Each shortcut is checked against the whole computation for its first few uses; one that disagrees
(a template that rewrites earlier turns, a tokenizer that merges across special tokens) is turned
off with a warning, and the whole computation is used from then on. Replies this engine
generated keep the ids they were generated as: re-tokenizing their text can give other ids,
which would change what the model sees and defeat KV-cache reuse. A reply is known by the
conversation it answered as well as by its text, so a text generated as other ids elsewhere, or
typed by a user, never lends its ids to this conversation: a conversation encodes to the same ids
whichever others the engine served in between. Where the conversation's text continues the very
prompt a reply was generated after with that reply, the reply stands there; a template that
rewrites earlier turns is searched with markers instead (see :meth:`PromptEncoder._split_at_replies`).
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from local_llm_kit.backends import Backend
from local_llm_kit.errors import TemplateError
from local_llm_kit.sealed import snapshot
from local_llm_kit.templates import ChatTemplate

__all__ = ["PromptEncoder", "ReplyPlace"]

logger = logging.getLogger(__name__)

# Recent replies whose generated token ids are kept for re-use in the next prompts.
_REMEMBERED_GENERATIONS = 64
# Tokenized segments of recent prompts (see _tokenize): a turn is tokenized once.
_SEGMENT_MEMO = 4096
# Segmented tokenizations checked against a whole one before the encoder trusts segmenting.
_SEGMENT_CHECKS = 8
# Recent renderings kept for incremental rendering, how far back from a conversation's end one
# is looked for, and how many incremental renderings are checked against a whole rendering.
_RENDER_MEMO = 64
_RENDER_LOOKBACK = 8
_RENDER_CHECKS = 8
# Parts of conversations rendered for incremental rendering (the opening and a few messages).
_PART_MEMO = 32
# How many messages back from the last known one a memoized part may start (see _part_start).
_PART_LOOKBACK = 6
# Encoded prefixes of recent conversations, and how many encodings built on one are checked.
_PREFIX_MEMO = 64
_PREFIX_CHECKS = 8

V = TypeVar("V")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


@dataclass(frozen=True, eq=False)
class _Prefix:
    """The ids of ``text``, the start of a rendered conversation cut where tokenization is split."""

    text: str
    ids: list[int]
    """Never changed (a list, not a tuple: copied once a turn, and a tuple would take two copies)."""


class PromptEncoder:
    """Renders and tokenizes conversations for one loaded model (thread-safe)."""

    def __init__(self, template: ChatTemplate, backend: Backend, model_name: str) -> None:
        self.template = template
        self.backend = backend
        self.model_name = model_name
        # Keyed by where the reply stands (the conversation before it, with its tools) and its
        # text: the same text generated as other ids in another conversation is another entry.
        self._generated: OrderedDict[tuple[_Key, str], _Reply] = OrderedDict()
        self._generated_lock = threading.Lock()
        self._segments: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._segments_lock = threading.Lock()
        self._segment_checks = _SEGMENT_CHECKS
        self._boundaries = self._segment_boundaries()
        self._renders: OrderedDict[_Key, str] = OrderedDict()  # text without the generation prompt
        self._renders_lock = threading.Lock()
        self._render_checks = _RENDER_CHECKS
        self.incremental_render = True
        self._parts: OrderedDict[tuple[Any, ...], str] = OrderedDict()  # see _render_part
        self._generation_prompts: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._generation_prompt_checks = _RENDER_CHECKS
        self.generation_prompt_reuse = True
        self._prefixes: OrderedDict[_Key, _Prefix] = OrderedDict()
        self._prefixes_lock = threading.Lock()
        self._prefix_checks = _PREFIX_CHECKS
        self.prefix_reuse = True
        # Reply markers (see _split_at_replies) are unique to this encoder, not to each call, so
        # that marked conversations render incrementally too.
        self._marker_salt = uuid.uuid4().hex

    # -- rendering ------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages``, rendering only what is new when it can.

        A conversation whose earlier messages were rendered recently is rendered as that text
        plus the rendering of the new messages: the template is applied to the opening messages
        (system messages and the first one after them, which templates treat specially), the
        last already-rendered message (which some templates look back to) and the new messages,
        and the opening's own rendering is cut off. The first few such renderings are checked
        against a whole rendering; a template whose output differs (one that looks further
        back, or rewrites earlier turns) is rendered whole from then on.
        """
        return self._render(messages, tools, add_generation_prompt, _Conversation.of(messages, tools))

    def _render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                add_generation_prompt: bool, conversation: _Conversation | None) -> str:
        if conversation is None or not self.incremental_render or len(messages) < 3:
            return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        text = self._render_incrementally(messages, conversation, tools, add_generation_prompt)
        if text is None:
            text = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            # What the next turn builds on: the text without the generation prompt.
            self._remember_render(conversation.key(), text if not add_generation_prompt else
                                  self.template.render(messages, tools=tools, add_generation_prompt=False))
        return text

    def _render_incrementally(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation,
                              tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool) -> str | None:
        opening = 0
        while opening < len(messages) and messages[opening].get("role") == "system":
            opening += 1
        opening += 1  # and the first message after the system messages
        # The known part is the conversation up to its last few messages (the previous turn:
        # a reply, tool results, the new user message); looked up by hash, longest first.
        found = _longest(self._renders, self._renders_lock, conversation, opening + 1)
        if found is None:
            return None
        known, known_text = found
        first = self._part_start(conversation, opening, known)
        head = self._render_part(messages, conversation, opening, first, known, tools)
        tail_open = self._render_part(messages, conversation, opening, first, len(messages), tools)
        tail = tail_open if not add_generation_prompt else \
            self._with_generation_prompt(messages, conversation, opening, first, tools, tail_open)
        if not (tail_open.startswith(head) and tail.startswith(head)):
            return None
        text = known_text + tail[len(head):]
        if self._render_checks > 0:
            whole = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            with self._renders_lock:
                self._render_checks -= 1
                if whole != text:
                    logger.warning("%s: the chat template renders conversations differently in parts than whole; "
                                   "rendering whole from now on", self.model_name)
                    self.incremental_render = False
                    self._render_checks = 0
            if whole != text:
                return whole
        if known < len(messages):
            self._remember_render(conversation.key(), known_text + tail_open[len(head):])
        return text

    def _remember_render(self, key: _Key, text: str) -> None:
        _remember(self._renders, self._renders_lock, key, text, _RENDER_MEMO)

    def _part_start(self, conversation: _Conversation, opening: int, known: int) -> int:
        """Where the part rendered before the new messages starts: at the last known message, or a
        few messages earlier where that part was rendered already (the previous request's last
        part is usually this one's head: the prompt's, for the count after its reply)."""
        with self._renders_lock:
            for first in range(known - 1, max(opening, known - _PART_LOOKBACK) - 1, -1):
                if _part_key(conversation, opening, first, known, False) in self._parts:
                    return first
        return max(opening, known - 1)

    def _render_part(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation, opening: int,
                     start: int, end: int, tools: Sequence[Mapping[str, Any]] | None,
                     add_generation_prompt: bool = False) -> str:
        """The template applied to the opening and ``messages[start:end]``, memoized by their snapshot.

        The part one request renders last is often the one the next starts from: the memory's
        count after a reply renders the same opening and new message as the reply-marked
        conversation it splits next, and both as the prompt rendered them.
        """
        key = _part_key(conversation, opening, start, end, add_generation_prompt)
        with self._renders_lock:
            text = self._parts.get(key)
            if text is not None:
                self._parts.move_to_end(key)
                return text
        text = self.template.render([*messages[:opening], *messages[start:end]], tools=tools,
                                    add_generation_prompt=add_generation_prompt)
        _remember(self._parts, self._renders_lock, key, text, _PART_MEMO)
        return text

    def _with_generation_prompt(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation,
                                opening: int, start: int, tools: Sequence[Mapping[str, Any]] | None,
                                open_text: str) -> str:
        """``open_text`` (the part rendered without the generation prompt) with the generation prompt.

        Templates append the same generation prompt to every conversation with one opening
        whose last message has one role (``<|im_start|>assistant\\n``, or nothing after an
        assistant message), so it is learned once per opening and role rather than rendered
        again. The first few are checked against a rendering; a template whose generation
        prompt depends on more (the content of the turn, say) is rendered every time from then on.
        """
        key = (conversation.tools, conversation.frozen[:opening], messages[-1].get("role"))
        with self._renders_lock:
            learned = self._generation_prompts.get(key) if self.generation_prompt_reuse else None
            if learned is not None and self._generation_prompt_checks <= 0:
                return open_text + learned
        text = self._render_part(messages, conversation, opening, start, len(messages), tools,
                                 add_generation_prompt=True)
        if not text.startswith(open_text):
            return text
        suffix = text[len(open_text):]
        with self._renders_lock:
            if learned is not None:
                self._generation_prompt_checks -= 1
                if learned != suffix and self.generation_prompt_reuse:
                    logger.warning("%s: the chat template's generation prompt depends on more than the opening "
                                   "and the last role; rendering it every time from now on", self.model_name)
                    self.generation_prompt_reuse = False
                    self._generation_prompts.clear()
            reuse = self.generation_prompt_reuse
        if reuse:  # a lookup checks reuse first: one stored by a thread that raced a disagreement is never read
            _remember(self._generation_prompts, self._renders_lock, key, suffix, _RENDER_MEMO)
        return text

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: exactly what the model is fed.

        An assistant message this engine generated keeps the token ids it was generated as; the
        rest of the text is tokenized normally. A conversation that extends one encoded recently
        starts from that one's ids (see the module's docstring).
        """
        return self.encode_prompt(messages, tools=tools, add_generation_prompt=add_generation_prompt)[0]

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]], *,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      add_generation_prompt: bool = True) -> tuple[list[int], ReplyPlace | None]:
        """:meth:`encode`, and where a reply to this conversation stands, for
        :meth:`remember_generation` (``None`` when a message does not serialize). The place is
        the conversation as it was encoded: later edits of the messages do not move it, and
        remembering a reply by it does not walk the history again."""
        conversation = _Conversation.of(messages, tools)
        text = self._render(messages, tools, add_generation_prompt, conversation)
        # The text the next turn starts with: this conversation without the generation prompt.
        base: str | None = text
        if add_generation_prompt:
            with self._renders_lock:
                base = self._renders.get(conversation.key()) if conversation is not None else None
        built: tuple[list[int], _Prefix | None] | None = None
        found = (_longest(self._prefixes, self._prefixes_lock, conversation, 1)
                 if conversation is not None and self.prefix_reuse else None)
        if found is not None and text.startswith(found[1].text):
            start, known = found
            built = self._encode_after(messages, conversation, text, tools, add_generation_prompt, base, start, known)
            if built is not None and self._prefix_checks > 0:
                built = self._check_prefixed(built, self._encode_whole(messages, conversation, text, tools,
                                                                       add_generation_prompt, base))
        if built is None:
            built = self._encode_whole(messages, conversation, text, tools, add_generation_prompt, base)
        ids, cut = built
        if conversation is not None and cut is not None and self.prefix_reuse:
            _remember(self._prefixes, self._prefixes_lock, conversation.key(), cut, _PREFIX_MEMO)
        return ids, (ReplyPlace(conversation.key(), text) if conversation is not None else None)

    def _encode_whole(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation | None, text: str,
                      tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool,
                      base: str | None) -> tuple[list[int], _Prefix | None]:
        built = self._encode_after(messages, conversation, text, tools, add_generation_prompt, base, 0, None)
        if built is None:  # the template treats reply markers unlike replies: nothing is spliced
            return self._tokenize(text), None
        return built

    def _encode_after(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation | None, text: str,
                      tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool,
                      base: str | None, start: int, known: _Prefix | None,
                      ) -> tuple[list[int], _Prefix | None] | None:
        """The ids of ``text``, starting from ``known`` (the ids of ``messages[:start]``'s text up to a cut).

        Also returns this conversation's own prefix: its ids up to the last cut that the text of
        a longer conversation will share (see :func:`_last_cut`).
        """
        offset = len(known.text) if known is not None else 0
        later = self._generated_replies(messages, conversation, start)
        if later:
            pieces = self._split_at_replies(messages, conversation, later, text, tools, add_generation_prompt)
            if pieces is None or len(pieces[0]) < offset:
                return None
            pieces[0] = pieces[0][offset:]
        else:
            pieces = [text[offset:]]
        ids = list(known.ids) if known is not None else []
        # Where tokenization is split (each piece's start, each segment's), as (text offset, ids
        # before it): the candidate cuts.
        cuts: list[tuple[int, int]] = []
        position = offset
        for piece, index in zip(pieces, [*sorted(later), None], strict=True):
            for segment, segment_ids in self._tokenize_segments(piece) or [("", ())]:
                if position > 0:
                    cuts.append((position, len(ids)))
                ids.extend(segment_ids)
                position += len(segment)
            if index is not None:
                ids.extend(later[index].ids)
                position += len(messages[index]["content"])
        return ids, (_last_cut(text, base, cuts, ids, self._boundaries) if base is not None else None)

    def _check_prefixed(self, built: tuple[list[int], _Prefix | None],
                        whole: tuple[list[int], _Prefix | None]) -> tuple[list[int], _Prefix | None]:
        with self._prefixes_lock:
            self._prefix_checks -= 1
            if built[0] != whole[0] and self.prefix_reuse:
                logger.warning("%s: encoding a conversation from its encoded start gave other ids than encoding it "
                               "whole; encoding whole from now on", self.model_name)
                self.prefix_reuse = False
                self._prefix_checks = 0
                self._prefixes.clear()
        return built if built[0] == whole[0] else whole

    def _generated_replies(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation | None,
                           start: int) -> dict[int, _Reply]:
        """The replies from ``messages[start]`` on that this engine generated, by index.

        A reply counts as generated where it stands after the very conversation it was generated
        for: the same text elsewhere (typed by a user, or generated as other ids in another
        conversation) is tokenized like any text, so that a conversation encodes to the same ids
        whichever other conversations the engine saw in between.
        """
        if conversation is None:
            return {}
        found: dict[int, _Reply] = {}
        with self._generated_lock:
            if not self._generated:
                return found
            for i in range(start, len(messages)):
                message = messages[i]
                if message.get("role") == "assistant" and isinstance(content := message.get("content"), str):
                    reply = self._generated.get((conversation.key(i), content))
                    if reply is not None:
                        found[i] = reply
        return found

    def remember_generation(self, place: ReplyPlace | None, content: str, token_ids: Sequence[int]) -> None:
        """Record that ``content`` was generated as ``token_ids`` at ``place`` (from
        :meth:`encode_prompt`): a later prompt that has this reply after that conversation feeds
        those ids again (see :meth:`encode`). Nothing is recorded without a place."""
        if place is None:  # a message that did not serialize: nothing to key the reply by
            return
        ids = [t for t in token_ids if t not in self.backend.info.eos_token_ids]
        if not content or b"".join(self.backend.token_bytes(t) for t in ids) != content.encode():
            return  # a stop string or a constraint changed the text: nothing to splice
        _remember(self._generated, self._generated_lock, (place.key, content), _Reply(ids, place.text),
                  _REMEMBERED_GENERATIONS)

    def _split_at_replies(self, messages: Sequence[Mapping[str, Any]], conversation: _Conversation | None,
                          generated: Mapping[int, _Reply], text: str, tools: Sequence[Mapping[str, Any]] | None,
                          add_generation_prompt: bool) -> list[str] | None:
        """The rendered text around the generated replies, found by where the template puts them.

        Where each reply follows the very prompt it was generated after, that is where it
        stands (:func:`_anchored_pieces`): no rendering is needed. Otherwise each reply is
        rendered as a unique marker instead, and the text between markers is what surrounds the
        replies. Searching for the reply's text instead would find a short reply ("Paris")
        inside an earlier message. ``None`` when the template treats the markers differently
        from the replies (it inspects or rewrites content): then nothing is spliced.
        """
        anchored = _anchored_pieces(text, messages, generated)
        if anchored is not None:
            return anchored
        markers = {i: f"\x1e\x1fllk-reply-{i}-{self._marker_salt}\x1f\x1e" for i in generated}
        marked = [dict(m, content=markers[i]) if i in markers else m for i, m in enumerate(messages)]
        # Its snapshot shares the conversation's up to the first reply (no need to freeze it again).
        marked_conversation = None if conversation is None else conversation.extended(marked, min(generated))
        try:
            rendered = self._render(marked, tools, add_generation_prompt, marked_conversation)
        except TemplateError:  # a template that rejects the marker: no splicing, same prompt
            logger.debug("template rejected reply markers; re-tokenizing replies", exc_info=True)
            return None
        pieces: list[str] = []
        rest = rendered
        for i in sorted(generated):
            before, found, rest = rest.partition(markers[i])
            if not found or markers[i] in rest:
                return None
            pieces.append(before)
        pieces.append(rest)
        rebuilt = "".join(p + (messages[i]["content"] if k < len(generated) else "")
                          for k, (p, i) in enumerate(zip(pieces, [*sorted(generated), -1], strict=True)))
        return pieces if rebuilt == text else None

    # -- tokenization ---------------------------------------------------------------------------
    def _segment_boundaries(self) -> tuple[str, ...]:
        """Texts of the end-of-turn special tokens, before which a prompt may be cut (see :meth:`_tokenize`).

        Only tokens the tokenizer reads back as themselves qualify: their markup in a text is
        parsed as the one special token, which is what makes the cut exact.
        """
        backend = self.backend
        found: list[str] = []
        for token in sorted(backend.info.eos_token_ids):
            try:
                text = backend.token_bytes(token).decode("utf-8")
                if len(text) > 1 and backend.tokenize(text) == [token]:
                    found.append(text)
            except (UnicodeDecodeError, IndexError, ValueError):
                continue
        return tuple(found)

    def _split_segments(self, text: str) -> list[str]:
        """``text`` cut right before every end-of-turn special token (one segment per turn)."""
        cuts = sorted({i for marker in self._boundaries for i in _find_all(text, marker) if i > 0})
        if not cuts:
            return [text]
        return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    def _tokenize(self, text: str) -> list[int]:
        return [t for _, ids in self._tokenize_segments(text) for t in ids]

    def _tokenize_segments(self, text: str) -> list[tuple[str, tuple[int, ...]]]:
        """``backend.tokenize(text)`` by segment, re-using the tokens of segments seen in earlier prompts.

        Tokenizers (llama.cpp's and Hugging Face's) split a text at special tokens before
        anything else and tokenize the pieces independently, so the text cut right before an
        end-of-turn token tokenizes to the concatenation of its segments' tokens. Each turn of a
        conversation is then tokenized once, when it is new. The first few segmented results
        are checked against a whole tokenization of the same text; a tokenizer for which they
        differ (one that strips whitespace around special tokens, say) is always tokenized whole
        from then on.
        """
        if not text:
            return []
        segments = self._split_segments(text) if self._boundaries else [text]
        misses: list[int] = []
        with self._segments_lock:
            found: list[tuple[int, ...] | None] = []
            for segment in segments:
                cached = self._segments.get(segment)
                if cached is not None:
                    self._segments.move_to_end(segment)
                found.append(cached)
        for i, segment in enumerate(segments):
            if found[i] is None:
                found[i] = tuple(self.backend.tokenize(segment))
                misses.append(i)
        result = [(segment, ids) for segment, ids in zip(segments, found, strict=True) if ids is not None]
        for i in misses:
            _remember(self._segments, self._segments_lock, segments[i], result[i][1], _SEGMENT_MEMO)
        if len(segments) > 1 and self._segment_checks > 0:
            whole = self._check_segmented(text, [t for _, ids in result for t in ids])
            if whole is not None:
                return [(text, tuple(whole))]
        return result

    def _check_segmented(self, text: str, ids: list[int]) -> list[int] | None:
        """``None`` when ``ids`` equal the whole tokenization of ``text``; else that tokenization."""
        whole = self.backend.tokenize(text)
        with self._segments_lock:
            self._segment_checks -= 1
            if whole != ids and self._boundaries:
                logger.warning("%s: tokenizing a prompt turn by turn gave other ids than tokenizing it whole; "
                               "tokenizing whole from now on", self.model_name)
                self._boundaries = ()
                self._segment_checks = 0
        return None if whole == ids else whole


class _Key:
    """The first ``size`` messages of a frozen conversation, with its tools: a memo key whose
    hash is precomputed, so that looking up each start of a long conversation costs no rehashing."""

    __slots__ = ("_hash", "frozen", "size", "tools")

    def __init__(self, tools: str, frozen: tuple[Any, ...], size: int, hash_: int) -> None:
        self.tools, self.frozen, self.size, self._hash = tools, frozen, size, hash_

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Key):
            return NotImplemented
        if self._hash != other._hash or self.size != other.size or self.tools != other.tools:
            return False
        return self.frozen is other.frozen or self.frozen[:self.size] == other.frozen[:other.size]


@dataclass(frozen=True, eq=False)
class ReplyPlace:
    """Where a reply stands (opaque; see :meth:`PromptEncoder.encode_prompt`): the conversation
    before it as it was encoded, and the text of that prompt, which the reply directly follows."""

    key: _Key
    text: str


class _Reply(NamedTuple):
    """A generated reply: its ids, and the text of the prompt it was generated after."""

    ids: list[int]
    anchor: str


def _anchored_pieces(text: str, messages: Sequence[Mapping[str, Any]],
                     generated: Mapping[int, _Reply]) -> list[str] | None:
    """The text around the generated replies where each follows its own prompt's text, else ``None``.

    A reply generated after a prompt continues that prompt's text: where ``text`` starts with
    the prompt's text followed by the reply's, the reply's ids are exactly what the model was
    fed and produced there (and what its KV cache holds), whatever the template does elsewhere.
    A template that rewrites earlier turns or the reply (stripping thoughts, say) fails this
    test and is split by markers instead.
    """
    pieces: list[str] = []
    position = 0
    for index in sorted(generated):
        anchor = generated[index].anchor
        content = messages[index]["content"]
        if len(anchor) < position or not text.startswith(anchor) or not text.startswith(content, len(anchor)):
            return None
        pieces.append(text[position:len(anchor)])
        position = len(anchor) + len(content)
    pieces.append(text[position:])
    return pieces


class _Conversation:
    """A hashable snapshot of a conversation and its tools, with the hash of each of its starts."""

    __slots__ = ("frozen", "item_hashes", "starts", "tools")

    def __init__(self, tools: str, frozen: tuple[Any, ...], item_hashes: list[int]) -> None:
        self.tools, self.frozen, self.item_hashes = tools, frozen, item_hashes
        self.starts: dict[int, int] = {}  # the hash of each start looked up, by its size

    @classmethod
    def of(cls, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
           ) -> _Conversation | None:
        """The snapshot, or ``None`` when a message or the tools do not serialize."""
        try:
            tools_key = json.dumps(tools, sort_keys=True, default=str) if tools else ""
        except (TypeError, ValueError):
            return None
        return cls(tools_key, (), []).extended(messages, 0)

    def extended(self, messages: Sequence[Mapping[str, Any]], start: int) -> _Conversation | None:
        """The snapshot of ``messages``, whose first ``start`` are this conversation's first ``start``."""
        # A remembered history is sealed (local_llm_kit.sealed): its snapshots were taken once,
        # and are the same objects from request to request, which also makes comparing keys cheap.
        try:
            snapshots = list(map(snapshot, messages[start:]))
        except (TypeError, ValueError):
            return None
        frozen, item_hashes = tuple(map(_first, snapshots)), list(map(_second, snapshots))
        if start:
            frozen, item_hashes = self.frozen[:start] + frozen, self.item_hashes[:start] + item_hashes
        return _Conversation(self.tools, frozen, item_hashes)

    def __len__(self) -> int:
        return len(self.frozen)

    def key(self, size: int | None = None) -> _Key:
        """The key of the first ``size`` messages (all of them by default)."""
        size = len(self.frozen) if size is None else size
        start_hash = self.starts.get(size)
        if start_hash is None:  # a few starts are looked up per conversation: hashed when asked
            start_hash = self.starts[size] = hash((self.tools, tuple(self.item_hashes[:size])))
        return _Key(self.tools, self.frozen, size, start_hash)


def _part_key(conversation: _Conversation, opening: int, start: int, end: int,
              add_generation_prompt: bool) -> tuple[Any, ...]:
    """The memo key of the part made of the opening and ``messages[start:end]`` (see ``_render_part``)."""
    frozen = conversation.frozen
    return conversation.tools, add_generation_prompt, frozen[:opening] + frozen[start:end]


def _longest(memo: OrderedDict[_Key, V], lock: threading.Lock, conversation: _Conversation,
             shortest: int) -> tuple[int, V] | None:
    """The memo entry for the longest start of ``conversation``, at most a few messages back."""
    size = len(conversation)
    with lock:
        for n in range(size, max(shortest - 1, size - _RENDER_LOOKBACK), -1):
            key = conversation.key(n)
            value = memo.get(key)
            if value is not None:
                memo.move_to_end(key)
                return n, value
    return None


def _remember(memo: OrderedDict[Any, Any], lock: threading.Lock, key: Any, value: Any, size: int) -> None:
    with lock:
        memo[key] = value
        memo.move_to_end(key)
        while len(memo) > size:
            memo.popitem(last=False)


def _last_cut(text: str, base: str, cuts: list[tuple[int, int]], ids: list[int],
              boundaries: tuple[str, ...]) -> _Prefix | None:
    """The ids up to the last cut that the next turn's text is sure to share, or ``None``.

    The next turn renders ``base`` (this conversation without the generation prompt), then new
    messages: a cut must lie within it, and a cut before an end-of-turn token needs the token's
    whole text there too (the next text might close the turn otherwise).
    """
    if not text.startswith(base):
        return None
    for offset, count in reversed(cuts):
        if offset == 0 or offset > len(base):
            continue
        marker = next((m for m in boundaries if text.startswith(m, offset)), None)
        if marker is not None and offset + len(marker) > len(base):
            continue
        return _Prefix(text[:offset], ids[:count])
    return None


def _find_all(text: str, marker: str) -> Iterator[int]:
    start = text.find(marker)
    while start >= 0:
        yield start
        start = text.find(marker, start + len(marker))
