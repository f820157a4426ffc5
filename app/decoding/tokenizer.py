"""Whisper's tokenizer: byte-level BPE text from `tokenizers`, special ids from the engine config.

The Systran-era tokenizer.json files lack the 1501 timestamp tokens, so timestamps are handled by
id arithmetic (id >= timestamp_begin) and never passed to the BPE decoder.
"""

from __future__ import annotations

import string
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as BpeTokenizer

from app.constants import TIME_PRECISION
from app.engine.config import EngineConfig, SpecialTokens
from app.languages import NO_SPACE_LANGUAGES


class WhisperTokenizer:
    def __init__(self, bpe: BpeTokenizer, special: SpecialTokens, multilingual: bool) -> None:
        self.bpe = bpe
        self.special = special
        self.multilingual = multilingual
        self.eot = special.eot
        self.sot = special.sot
        self.no_timestamps = special.no_timestamps
        self.timestamp_begin = special.timestamp_begin
        self.no_speech = special.no_speech
        self.sot_prev = special.sot_prev
        self.language_to_id = dict(special.languages)
        self.id_to_language = {v: k for k, v in special.languages.items()}

    @classmethod
    def from_engine(cls, engine_dir: Path, config: EngineConfig) -> WhisperTokenizer:
        bpe = BpeTokenizer.from_file(str(engine_dir / config.tokenizer_file))
        return cls(bpe, config.special_tokens, config.multilingual)

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the tokens, dropping every special and timestamp token."""
        return self.bpe.decode([t for t in tokens if t < self.eot], skip_special_tokens=False)

    def decode_with_timestamps(self, tokens: list[int]) -> str:
        out: list[str] = []
        text: list[int] = []
        for t in tokens:
            if t >= self.timestamp_begin:
                out.append(self.decode(text))
                text = []
                out.append(f"<|{(t - self.timestamp_begin) * TIME_PRECISION:.2f}|>")
            else:
                text.append(t)
        out.append(self.decode(text))
        return "".join(out)

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        if not self.multilingual:
            return [self.sot]  # English-only models take no language or task token
        seq = [self.sot]
        if language is not None:
            seq.append(self.language_to_id[language])
        seq.append(self.special.translate if task == "translate" else self.special.transcribe)
        return seq

    @cached_property
    def language_token_ids(self) -> list[int]:
        return list(self.id_to_language)

    def split_to_words(self, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
        if language in NO_SPACE_LANGUAGES:
            return self._split_by_unicode(tokens)
        return self._split_by_spaces(tokens)

    def _split_by_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        # A character may span several byte-level tokens: emit a word once its bytes decode cleanly.
        words: list[str] = []
        word_tokens: list[list[int]] = []
        current: list[int] = []
        full = self.decode(tokens)
        offset = 0
        for token in tokens:
            current.append(token)
            decoded = self.decode(current)
            if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def _split_by_spaces(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        sub_words, sub_tokens = self._split_by_unicode(tokens)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for sub, toks in zip(sub_words, sub_tokens, strict=True):
            special = toks[0] >= self.eot
            with_space = sub.startswith(" ")
            punctuation = sub.strip() in string.punctuation
            if special or with_space or punctuation or not words:
                words.append(sub)
                word_tokens.append(list(toks))
            else:
                words[-1] += sub
                word_tokens[-1].extend(toks)
        return words, word_tokens
