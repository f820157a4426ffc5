"""The OpenAI transcription/translation form: validation and mapping onto TranscribeOptions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.api.registry import ServedModel
from app.api.upload import MultipartForm
from app.audio.vad import VadOptions
from app.config import Settings
from app.decoding.options import DEFAULT_TEMPERATURES, Task, TranscribeOptions, WindowOptions
from app.errors import InvalidRequestError
from app.languages import LANGUAGES

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
Granularity = Literal["word", "segment"]

_LANGUAGE_BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}


class TranscriptionForm(BaseModel):
    """The text fields of OpenAI's audio endpoints (the file travels separately)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    #: 0 (the default) means OpenAI's "automatic" temperature: the fallback sequence 0, 0.2 .. 1.0.
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: tuple[Granularity, ...] = ("segment",)
    stream: bool = False

    @field_validator("timestamp_granularities", mode="before")
    @classmethod
    def _dedupe(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(dict.fromkeys(value))
        return value

    @classmethod
    def from_multipart(cls, form: MultipartForm) -> TranscriptionForm:
        raw: dict[str, object] = {}
        for name in ("model", "language", "prompt", "response_format", "temperature", "stream"):
            value = form.get(name)
            # SDKs and HTML forms send empty strings for unset fields; treat them as unset.
            if value is not None and value.strip() != "":
                raw[name] = value.strip() if name != "prompt" else value
        # The OpenAI SDK sends `timestamp_granularities[]` once per value; accept the bare name too.
        granularities = form.get_all("timestamp_granularities[]") + form.get_all(
            "timestamp_granularities"
        )
        granularities = [g.strip() for g in granularities if g.strip()]
        if granularities:
            raw["timestamp_granularities"] = granularities
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            param = str(error["loc"][0]) if error["loc"] else None
            if param == "timestamp_granularities":
                param = "timestamp_granularities[]"
            raise InvalidRequestError(
                f"Invalid value for '{param}': {error['msg']}", param=param
            ) from None


def resolve_language(language: str | None, model: ServedModel) -> str | None:
    """An ISO-639-1 code the model can decode, or None to detect; 400 (param language) otherwise."""
    if language is None:
        return None
    key = language.strip().lower()
    code = key if key in LANGUAGES else _LANGUAGE_BY_NAME.get(key)
    if code is None:
        raise InvalidRequestError(
            f"Unsupported language '{language}'. Use an ISO-639-1 code such as 'en' or 'fr'.",
            param="language",
        )
    if not model.multilingual:
        if code != "en":
            raise InvalidRequestError(
                f"Model '{model.name}' is English-only; language must be 'en' or omitted.",
                param="language",
            )
    elif model.languages and code not in model.languages:
        raise InvalidRequestError(
            f"Model '{model.name}' does not support language '{code}'.", param="language"
        )
    return code


def vad_options(settings: Settings) -> VadOptions | None:
    """Speech gating for requests, or None with WHISPER_VAD=false."""
    if not settings.vad:
        return None
    return VadOptions(
        threshold=settings.vad_threshold,
        min_speech_ms=settings.vad_min_speech_ms,
        min_silence_ms=settings.vad_min_silence_ms,
        speech_pad_ms=settings.vad_speech_pad_ms,
    )


def build_transcribe_options(
    form: TranscriptionForm, *, task: Task, model: ServedModel, settings: Settings
) -> TranscribeOptions:
    language = resolve_language(form.language, model)
    if not model.multilingual:
        # An English-only model has no translate token and only hears English: "translating"
        # to English is transcribing (openai-whisper does the same).
        task, language = "transcribe", "en"
    # OpenAI: temperature 0 lets the model raise it on failure (log-prob / compression
    # thresholds); any other value is used as is, without fallback.
    temperatures = DEFAULT_TEMPERATURES if form.temperature == 0 else (form.temperature,)
    window = WindowOptions(
        task=task, language=language, temperature=temperatures[0], beam_size=settings.beam_size
    )
    return TranscribeOptions(
        window=window,
        temperatures=temperatures,
        initial_prompt=form.prompt or None,
        word_timestamps="word" in form.timestamp_granularities,
        long_form="vad" if settings.vad_long_form else "sequential",
        vad=vad_options(settings),
    )
