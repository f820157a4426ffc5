"""Stable partial transcripts: only send text that two consecutive decodes agree on.

While a turn is open its audio is re-decoded every so often. The tail of each hypothesis is
unreliable (the last word may be cut in half, and Whisper revises its guess as context
arrives), but words that two consecutive decodes of growing audio agree on rarely change:
this is "local agreement" (LocalAgreement-2). What has been sent is never retracted, so
deltas only ever extend the text already sent (the turn's `completed` event carries the final
transcript, which is authoritative).

Agreement compares words loosely (case and punctuation ignored: "so," and "so..." agree)
because Whisper often re-punctuates as the sentence grows; the words sent are taken from
the newest hypothesis.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w']+")


def _key(word: str) -> str:
    return _PUNCTUATION.sub("", word.lower())


def _agreed_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common word prefix, comparing words loosely."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if _key(x) != _key(y):
            break
        n += 1
    return n


class StablePrefix:
    """Turns successive hypotheses of one growing turn into append-only text deltas."""

    def __init__(self) -> None:
        self.sent = ""  # concatenation of every delta returned so far
        self._sent_words: list[str] = []
        self._previous: list[str] | None = None

    def update(self, hypothesis: str) -> str:
        """Feed the newest decode of the turn; return the newly stable text ('' if none)."""
        words = hypothesis.split()
        previous, self._previous = self._previous, words
        if previous is None:
            return ""
        done = len(self._sent_words)
        if not (self._still_aligned(previous) and self._still_aligned(words)):
            return ""  # the decodes no longer line up with what was sent: wait
        # The older decode's last word is left out: that is where the audio ended, often in
        # the middle of a word ("you" for "your"), and the newer decode tends to repeat it.
        agreed = done + _agreed_length(previous[done:-1], words[done:])
        if agreed <= done:
            return ""
        new_words = words[done:agreed]
        delta = (" " if self._sent_words else "") + " ".join(new_words)
        self._sent_words.extend(new_words)
        self.sent += delta
        return delta

    def _still_aligned(self, words: list[str]) -> bool:
        """Whether `words` continue the text sent, allowing a few substituted words.

        A word that was sent and that later decodes revise ("asked" -> "ask") cannot be taken
        back; the next words still line up one to one, so the partials go on after it instead
        of stopping for the rest of the turn. An inserted or dropped word shifts every later
        position, shows up as many mismatches, and holds the partials back until the decodes
        line up again.
        """
        done = len(self._sent_words)
        if len(words) < done:
            return False
        mismatches = sum(_key(a) != _key(b) for a, b in zip(self._sent_words, words, strict=False))
        return mismatches <= max(1, done // 8)

    def remainder(self, final: str) -> str:
        """The delta that completes `final`, or '' if the text sent is not a prefix of it.

        OpenAI's `...completed` event carries the whole transcript, so when the final decode
        (beam search, fallback) differs from the greedy partials the client takes the final
        and no corrective delta is sent.
        """
        final = final.strip()
        if final.startswith(self.sent):
            return final[len(self.sent) :]
        return ""
