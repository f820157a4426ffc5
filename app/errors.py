"""Domain errors. The API layer maps each one to an HTTP status and an OpenAI-style body."""

from __future__ import annotations


class WhisperServeError(Exception):
    """Base class: every error we raise on purpose derives from this."""

    #: OpenAI error "type" field used when this reaches a client.
    error_type: str = "server_error"
    #: HTTP status used by the API layer.
    status_code: int = 500
    #: Machine-readable code (OpenAI "code" field).
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(WhisperServeError):
    error_type = "invalid_request_error"
    status_code = 400
    code = "invalid_value"


class ModelNotFoundError(InvalidRequestError):
    """A request names a model this process does not serve."""

    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model")


class AudioDecodeError(InvalidRequestError):
    """The bytes could not be decoded as audio (corrupt, truncated, empty, not audio)."""

    code = "invalid_audio"


class UnsupportedMediaError(InvalidRequestError):
    status_code = 415
    code = "unsupported_media_type"


class AudioTooLongError(InvalidRequestError):
    status_code = 413
    code = "audio_too_long"


class EngineError(WhisperServeError):
    """An engine directory is missing, incomplete or inconsistent."""

    code = "engine_error"


class EngineNotFoundError(EngineError):
    pass


class BackendUnavailableError(EngineError):
    """The engine's runtime backend cannot run on this machine (e.g. TensorRT-LLM not installed)."""


class CheckpointError(WhisperServeError):
    """A source checkpoint given to build_engines.py is wrong, corrupt or incomplete."""


class QueueFullError(WhisperServeError):
    error_type = "server_error"
    status_code = 503
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(QueueFullError):
    code = "shutting_down"


class AudioBudgetError(QueueFullError):
    """The process-wide budget for decoded audio in memory is spent (WHISPER_AUDIO_MEMORY_BUDGET_MB)."""

    code = "server_busy"


class EngineStepError(WhisperServeError):
    """A decode step failed; only the windows in that step are failed (logged with the cause)."""

    code = "engine_error"

    def __init__(self) -> None:
        super().__init__("The server had an error while processing your request.")
