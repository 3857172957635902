"""Stop strings across pieces of streamed text, and hold-back: no released text shows part of a stop string."""

import random

import pytest

from gptq_bridge.stopping import StopMatcher


def run(pieces, stops):
    m = StopMatcher(stops)
    released = [m.feed(p) for p in pieces]
    if m.stopped is None:
        released.append(m.flush())
    return released, m


def test_a_stop_string_spanning_pieces_ends_the_text_before_it():
    released, m = run(["Paris.\n#", "## Ins", "truction:", " more"], ["### Instruction:"])
    assert "".join(released) == "Paris.\n"
    assert m.stopped == "### Instruction:"
    assert released == ["Paris.\n", "", "", ""]


def test_text_that_might_start_a_stop_string_is_held_until_decided():
    m = StopMatcher(["##"])
    assert m.feed("ab#") == "ab"  # '#' could be the start of '##'
    assert m.feed("c") == "#c"  # it was not
    assert m.feed("#") == ""
    assert m.flush() == "#"  # generation ended for another reason: held text is released
    assert m.stopped is None


def test_hold_back_uses_the_longest_possible_start():
    m = StopMatcher(["abcd", "cx"])
    assert m.feed("zzabc") == "zz"  # 'abc' may become 'abcd' (and 'c' may become 'cx')
    assert m.feed("y") == "abcy"


def test_the_earliest_stop_string_wins():
    released, m = run(["one two three"], ["three", "two"])
    assert "".join(released) == "one " and m.stopped == "two"
    released, m = run(["xab"], ["b", "ab"])
    assert "".join(released) == "x" and m.stopped == "ab"


def test_nothing_after_a_stop_is_released():
    m = StopMatcher(["END"])
    assert m.feed("abcEN") == "abc"
    assert m.feed("Dxyz") == ""
    assert m.feed("more") == "" and m.flush() == ""


def test_no_stops_releases_everything_at_once():
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopMatcher(["a", ""])


@pytest.mark.parametrize("seed", range(20))
def test_any_split_gives_the_same_text_and_never_shows_part_of_the_stop(seed):
    rng = random.Random(seed)
    stop = rng.choice(["</s>", "### Instruction:", "\nUser:", "aab"])
    body = "".join(rng.choice("ab #<\n/Uuser:") for _ in range(rng.randint(0, 40)))
    text = body + stop + "tail"
    expected = text[: text.find(stop)]
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher([stop])
    shown = ""
    for p in pieces:
        shown += m.feed(p)
        assert expected.startswith(shown)  # never anything past the stop's start
    assert shown == expected and m.stopped == stop
