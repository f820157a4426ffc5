"""Stable-prefix agreement of partial transcripts, and the audio buffer under it."""

from __future__ import annotations

import numpy as np

from app.streaming.buffer import AudioBuffer
from app.streaming.partials import StablePrefix


def feed(hypotheses: list[str]) -> tuple[StablePrefix, list[str]]:
    stable = StablePrefix()
    return stable, [stable.update(h) for h in hypotheses]


def test_only_words_two_decodes_agree_on_are_sent() -> None:
    stable, deltas = feed(
        [
            "And so",
            "And so my thumb",
            "And so my fellow American",
            "And so my fellow Americans ask",
        ]
    )
    # The older decode's last word never counts: it is where that decode's audio ended.
    assert deltas == ["", "And", " so my", " fellow"]
    assert stable.sent == "And so my fellow"


def test_agreement_ignores_case_and_punctuation_but_never_retracts() -> None:
    stable, deltas = feed(["And so...", "and so, my", "And so, my fellow"])
    assert deltas == ["", "and", " so,"]
    # A decode that no longer lines up with what was sent (a word inserted before it) adds
    # nothing, and neither does the next one, until two consecutive decodes line up again.
    assert stable.update("Oh and so my fellow") == ""
    assert stable.update("And so my fellow Americans") == ""
    assert stable.update("And so my fellow Americans ask") == " my fellow"
    assert stable.sent == "and so, my fellow"


def test_the_first_decode_alone_sends_nothing() -> None:
    _, deltas = feed(["Hello world."])
    assert deltas == [""]


def test_remainder_completes_the_final_when_consistent() -> None:
    stable, _ = feed(["ask not what", "ask not what your"])
    assert stable.sent == "ask not"
    assert stable.remainder(" ask not what your country can do.") == " what your country can do."
    assert stable.remainder("Ask not, what your country") == ""  # final differs: no delta


def test_audio_buffer_keeps_absolute_positions() -> None:
    buffer = AudioBuffer(initial_capacity=4)
    buffer.append(np.arange(10, dtype=np.float32))
    buffer.drop_before(4)
    assert (buffer.start, buffer.end, len(buffer)) == (4, 10, 6)
    buffer.append(np.arange(10, 20, dtype=np.float32))
    assert buffer.slice(8, 12).tolist() == [8, 9, 10, 11]
    assert buffer.slice(0, 5).tolist() == [4]  # clamped to what is held
    buffer.clear()
    assert (buffer.start, buffer.end, len(buffer)) == (20, 20, 0)


def test_a_revised_word_does_not_stop_later_partials() -> None:
    stable, deltas = feed(["my fellow Americans asked not", "my fellow Americans asked not what"])
    assert stable.sent == "my fellow Americans asked"
    # Later decodes revise "asked" to "ask"; the words after it still line up and are sent.
    assert stable.update("my fellow Americans ask not what your") == " not"
    assert stable.update("my fellow Americans ask not what your country") == " what"
    # A decode that inserts a word shifts everything after it: nothing until they line up again.
    assert stable.update("and my fellow Americans ask not what your country") == ""
    assert stable.sent == "my fellow Americans asked not what"
