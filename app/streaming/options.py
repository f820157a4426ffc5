"""What a realtime session's transcripts are decoded with.

Finals get exactly the options an upload of the same audio gets (the API's mapping of model,
language and prompt, reached through `ModelResolver`), so `...completed` carries what POST
/v1/audio/transcriptions returns; partials are greedy, token-budgeted decodes of the open turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from app.config import Settings
from app.decoding.options import TranscribeOptions
from app.errors import InvalidRequestError, ModelNotFoundError
from app.streaming.events import ProtocolError
from app.streaming.session_config import SessionConfig

if TYPE_CHECKING:  # app.runtime imports torch, which must not load with the API modules
    from app.runtime import Runtime

#: Token budget of a partial decode: generous for fast speech (~4 tokens/s is typical), and
#: it stops a decode that started repeating itself from running to the window's token limit
#: (app.constants.MAX_NEW_TOKENS).
PARTIAL_TOKENS_PER_SECOND = 8
PARTIAL_MIN_TOKENS = 8


class ModelResolver(Protocol):
    """The API's mapping of a transcription request (app.api.forms): the runtime serving
    `model` and the options an upload with this language and prompt is decoded with.

    Raises ModelNotFoundError, or InvalidRequestError whose `param` names the request field.
    """

    def __call__(
        self, *, model: str | None, language: str | None, prompt: str | None
    ) -> tuple[Runtime, TranscribeOptions]: ...


@dataclass(frozen=True)
class Decoding:
    """The runtime and decode options a session's configuration resolves to."""

    runtime: Runtime
    final: TranscribeOptions
    partial: TranscribeOptions


def resolve_decoding(
    config: SessionConfig, resolve: ModelResolver, settings: Settings, param_prefix: str
) -> Decoding:
    """Runtime and options for a configuration; ProtocolError names the offending field."""
    try:
        runtime, final = resolve(model=config.model, language=config.language, prompt=config.prompt)
    except ModelNotFoundError as exc:
        raise ProtocolError(
            exc.message, code="model_not_found", param=f"{param_prefix}.model"
        ) from None
    except InvalidRequestError as exc:
        raise ProtocolError(
            exc.message, code=exc.code or "invalid_value", param=f"{param_prefix}.{exc.param}"
        ) from None
    greedy = TranscribeOptions.greedy()
    partial = replace(
        greedy,
        window=replace(greedy.window, task=final.window.task, language=final.window.language),
        initial_prompt=final.initial_prompt,
        # Partials are gated like finals: a turn (or, without turn detection, a buffer) of
        # silence or noise is never decoded and sends no delta.
        vad=final.vad,
        # Partials encode only the open turn's audio (not a 30 s window): on a CPU that is what
        # lets them keep pace with speech; the final decode uses whole windows, as REST does.
        trim_audio_context=settings.realtime_partial_trim_audio,
    )
    return Decoding(runtime, final, partial)


def partial_options(options: TranscribeOptions, seconds: float) -> TranscribeOptions:
    """`options` with the token budget of a partial decode of `seconds` of audio."""
    budget = PARTIAL_MIN_TOKENS + math.ceil(PARTIAL_TOKENS_PER_SECOND * seconds)
    if budget >= options.window.max_new_tokens:
        return options
    return replace(options, window=replace(options.window, max_new_tokens=budget))
