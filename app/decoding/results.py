"""What transcription returns: words, segments, the whole transcript."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class Segment:
    id: int
    seek: int  # mel frame offset of the window this segment came from
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None


@dataclass
class TranscriptionResult:
    text: str
    segments: list[Segment]
    language: str
    duration: float  # seconds of input audio
    language_probability: float | None = None
    task: str = "transcribe"
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
