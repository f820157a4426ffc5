"""Special token ids and default suppress lists of a Whisper vocabulary.

Ids follow from the vocabulary size (docs/weights.md, "Special token ids") and are
cross-checked against the tokenizer, so a tokenizer.json that belongs to another model is
refused at build time instead of producing garbage at run time.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from app.engine.config import SpecialTokens
from app.errors import CheckpointError
from app.languages import LANGUAGES

ENGLISH_ONLY_VOCAB = 51864
#: Vocabulary ids below the specials: the 50256 GPT-2 byte-pair tokens (+ eot for .en).
NUM_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
#: Tokens between the languages and the timestamps (translate ... notimestamps).
_TASK_TOKENS = ("translate", "transcribe", "sot_lm", "sot_prev", "no_speech", "no_timestamps")

#: Token text of each special (several spellings where tokenizer releases differ).
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "eot": ("<|endoftext|>",),
    "sot": ("<|startoftranscript|>",),
    "translate": ("<|translate|>",),
    "transcribe": ("<|transcribe|>",),
    "sot_lm": ("<|startoflm|>",),
    "sot_prev": ("<|startofprev|>",),
    "no_speech": ("<|nospeech|>", "<|nocaptions|>"),
    "no_timestamps": ("<|notimestamps|>",),
    "timestamp_begin": ("<|0.00|>",),
}

#: Symbols Whisper never transcribes as speech: suppressed alone and after a space.
_NON_SPEECH_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    [
        "<<",
        ">>",
        "<<<",
        ">>>",
        "--",
        "---",
        "-(",
        "-[",
        "('",
        '("',
        "((",
        "))",
        "(((",
        ")))",
        "[[",
        "]]",
        "{{",
        "}}",
        "♪♪",
        "♪♪♪",
    ]
)
#: Musical symbols are multi-byte; suppress their first byte-level token even if they take more.
_MUSICAL_SYMBOLS = list("♩♪♫♬♭♮♯")


def is_multilingual(n_vocab: int) -> bool:
    return n_vocab >= ENGLISH_ONLY_VOCAB + 1


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise CheckpointError(f"{path} is not a readable tokenizer.json: {exc}") from exc


def expected_special_tokens(n_vocab: int) -> SpecialTokens:
    """The ids a vocabulary of this size has (English-only: 51864; 99 languages: 51865; 100: 51866)."""
    multilingual = is_multilingual(n_vocab)
    # The vocabulary is: byte-pair tokens, eot, sot, languages, task tokens, timestamps.
    eot = 50256 + int(multilingual)
    num_languages = n_vocab - NUM_TIMESTAMPS - len(_TASK_TOKENS) - (eot + 2)
    if n_vocab < ENGLISH_ONLY_VOCAB or num_languages > len(LANGUAGES):
        raise CheckpointError(
            f"a vocabulary of {n_vocab} tokens is not a Whisper vocabulary (English-only models "
            f"have {ENGLISH_ONLY_VOCAB}, multilingual ones {ENGLISH_ONLY_VOCAB + 1} or "
            f"{ENGLISH_ONLY_VOCAB + 2})"
        )
    sot = eot + 1
    first_task = sot + 1 + num_languages
    tasks = {name: first_task + offset for offset, name in enumerate(_TASK_TOKENS)}
    codes = list(LANGUAGES)[:num_languages] if multilingual else []
    return SpecialTokens(
        eot=eot,
        sot=sot,
        **tasks,
        timestamp_begin=tasks["no_timestamps"] + 1,
        # English-only models never emit a language token, so none are offered.
        languages={code: sot + 1 + index for index, code in enumerate(codes)},
    )


def special_tokens(n_vocab: int, tokenizer: Tokenizer, tokenizer_path: Path) -> SpecialTokens:
    """The special ids of the model, checked against every special the tokenizer spells out."""
    expected = expected_special_tokens(n_vocab)
    if (
        tokenizer.token_to_id("<|endoftext|>") is None
        or tokenizer.token_to_id("<|startoftranscript|>") is None
    ):
        raise CheckpointError(
            f"{tokenizer_path} is not a Whisper tokenizer (no <|endoftext|> / <|startoftranscript|>)"
        )
    checks = {name: (spellings, getattr(expected, name)) for name, spellings in _SPELLINGS.items()}
    checks |= {
        f"language {code}": ((f"<|{code}|>",), token) for code, token in expected.languages.items()
    }
    for what, (spellings, want) in checks.items():
        for spelling in spellings:
            found = tokenizer.token_to_id(spelling)
            if found is not None and found != want:
                kind = "multilingual" if is_multilingual(n_vocab) else "English-only"
                raise CheckpointError(
                    f"{tokenizer_path} maps {spelling} to {found}, but the model's {n_vocab}-token "
                    f"({kind}) vocabulary has {what} at {want}: the tokenizer belongs to another "
                    "model; pass the matching one with --tokenizer"
                )
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= n_vocab:
        raise CheckpointError(
            f"{tokenizer_path} has token id {largest}, beyond the model's {n_vocab} tokens"
        )
    return expected


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def non_speech_tokens(tokenizer: Tokenizer) -> set[int]:
    """Ids of tokens that are only punctuation/symbols Whisper should not emit as speech."""
    ids = {_encode(tokenizer, " -")[0], _encode(tokenizer, " '")[0]}
    for symbol in _NON_SPEECH_SYMBOLS + _MUSICAL_SYMBOLS:
        for text in (symbol, " " + symbol):
            tokens = _encode(tokenizer, text)
            if len(tokens) == 1 or (tokens and symbol in _MUSICAL_SYMBOLS):
                ids.add(tokens[0])
    return ids


def default_suppress_tokens(tokenizer: Tokenizer, special: SpecialTokens) -> list[int]:
    """Whisper's suppress_tokens="-1": non-speech symbols plus the task/control specials."""
    controls = {
        special.translate,
        special.transcribe,
        special.sot,
        special.sot_prev,
        special.sot_lm,
        special.no_speech,
    }
    return sorted(non_speech_tokens(tokenizer) | controls)


def default_suppress_tokens_begin(tokenizer: Tokenizer, special: SpecialTokens) -> list[int]:
    """Suppressed at the first sampled position: a lone space and end-of-text."""
    space = _encode(tokenizer, " ")
    return [space[0], special.eot] if len(space) == 1 else [special.eot]
