import pytest

from local_llm_kit.text import IncrementalDecoder, StopStringMatcher


def test_multibyte_character_split_across_tokens_is_held_back() -> None:
    data = "é🙂".encode()
    decoder = IncrementalDecoder()
    pieces = [decoder.feed(data[i:i + 1]) for i in range(len(data))]
    assert pieces[0] == "" and pieces[1] == "é"
    assert pieces[2:5] == ["", "", ""] and pieces[5] == "🙂"
    assert decoder.flush() == ""


def test_truncated_character_is_replaced_at_the_end() -> None:
    decoder = IncrementalDecoder()
    assert decoder.feed("🙂".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(("pieces", "expected"), [
    (["Hello ", "wor", "ld", "END", "more"], ("Hello world", True)),
    (["Hello E", "N", "D!"], ("Hello ", True)),
    (["xxE", "NxEND"], ("xxENx", True)),
    (["no stop here E"], ("no stop here E", False)),
    (["EN", "d"], ("ENd", False)),
])
def test_stop_strings_spanning_tokens_never_leak(pieces: list[str], expected: tuple[str, bool]) -> None:
    assert run(["END"], pieces) == expected


def test_earliest_of_several_stops_wins() -> None:
    assert run(["BB", "A"], ["xxBBA"]) == ("xx", True)
    assert run(["\n\n", "User:"], ["one\nUs", "er: two"]) == ("one\n", True)


def test_held_back_text_is_emitted_once_it_cannot_be_a_stop() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abST") == ("ab", False)
    assert matcher.push("x") == ("STx", False)
