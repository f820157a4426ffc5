"""One realtime transcription session: audio in; turns, partial and final transcripts out.

Independent of the transport: `handle()` takes one client message, events leave through the
`emit` callback (the WebSocket's outbox). The state machine:

- Audio (base64 PCM16 at 24 or 16 kHz) is resampled to 16 kHz and appended to the buffer.
- Turns: with `server_vad`, StreamingVad opens a turn at speech start (minus prefix
  padding) and commits it `silence_duration_ms` after speech ends; without turn detection
  a turn opens with the first audio after a commit and the client commits it.
- Partials: while a turn is open its audio is re-decoded greedily every
  `realtime_partial_interval_s` of new audio, at most one decode in flight per session
  (a tick that finds one running is skipped); only text two consecutive decodes agree on
  is sent, as `...input_audio_transcription.delta`.
- Finals: a committed turn is decoded with exactly the REST endpoint's default options, so
  `...completed` carries what POST /v1/audio/transcriptions returns for that audio.

Every decode goes through the model's runtime, i.e. the same scheduler as uploads, so
streams and uploads are batched together.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from app import metrics
from app.audio.pcm import pcm16_to_float
from app.audio.resample import StreamResampler
from app.audio.vad import StreamingVad
from app.config import Settings
from app.constants import SAMPLE_RATE
from app.errors import ModelNotFoundError, WhisperServeError
from app.streaming.budget import PartialBudget
from app.streaming.buffer import AudioBuffer
from app.streaming.events import (
    AudioAppend,
    Cleared,
    ClientEvent,
    Committed,
    ErrorDetail,
    ErrorEvent,
    ItemCreated,
    ProtocolError,
    ServerEvent,
    SessionEvent,
    SessionUpdate,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    new_id,
    parse_client_event,
)
from app.streaming.options import Decoding, ModelResolver, partial_options, resolve_decoding
from app.streaming.partials import StablePrefix
from app.streaming.session_config import SessionConfig, apply_update, render_session

log = logging.getLogger(__name__)

#: (event, latency_from): latency_from is the perf_counter arrival time of the audio that
#: triggered a partial, so the sender can time it; None for every other event.
Emit = Callable[[ServerEvent, float | None], None]

#: OpenAI refuses to commit less than 100 ms of audio.
MIN_COMMIT_S = 0.1
#: Silence kept before a VAD speech start besides the prefix padding: the detector reports
#: a start some frames after it happened.
VAD_LAG_S = 0.5


def _ms(samples: int) -> int:
    return round(samples * 1000 / SAMPLE_RATE)


@dataclass(eq=False)
class Turn:
    """The open (uncommitted) turn: one future conversation item."""

    item_id: str
    start: int  # absolute sample position of its first sample
    partials: StablePrefix = field(default_factory=StablePrefix)
    decoded_until: int = 0  # buffer end at the last partial decode


class TranscriptionSession:
    def __init__(
        self,
        *,
        resolve: ModelResolver,
        settings: Settings,
        emit: Emit,
        budget: PartialBudget | None = None,
        legacy: bool = False,
        model: str | None = None,
    ) -> None:
        self.id = new_id("sess")
        self._resolve = resolve
        self._budget = budget or PartialBudget(settings.realtime_max_partial_decodes)
        self._settings = settings
        self._emit = emit
        self._legacy = legacy  # OpenAI-Beta: realtime=v1 clients get the older event names
        self.expires_at = time.time() + settings.realtime_max_session_s
        config = SessionConfig()
        if model:
            # A `?model=` naming one of ours picks it; OpenAI model names there are ignored.
            try:
                resolve(model=model, language=None, prompt=None)
                config = replace(config, model=model)
            except ModelNotFoundError:
                pass
        self.config = config
        self._decoding = resolve_decoding(config, resolve, settings, self._param_prefix(False))
        self._resampler = StreamResampler(config.sample_rate, SAMPLE_RATE)
        self._buffer = AudioBuffer()
        self._vad, self._vad_origin = self._new_vad(), 0
        self._turn: Turn | None = None
        self._last_item_id: str | None = None
        self._last_arrival = time.perf_counter()
        self._partial_task: asyncio.Task[None] | None = None
        self._finals: set[asyncio.Task[None]] = set()
        self._last_final: asyncio.Task[None] | None = None
        self._closed = False

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        name = "transcription_session.created" if self._legacy else "session.created"
        self._send(SessionEvent(type=name, session=self._render(self._legacy)))

    async def aclose(self) -> None:
        """Cancel the session's decodes so they free their scheduler slots."""
        self._closed = True
        tasks = [t for t in (self._partial_task, *self._finals) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def awaiting_finals(self) -> bool:
        """Committed turns still being transcribed: the client is waiting, not idle."""
        return bool(self._finals)

    def buffered_seconds(self) -> float:
        return len(self._buffer) / SAMPLE_RATE

    # ---- client messages --------------------------------------------------------------------

    def handle(self, data: str | bytes, arrived: float) -> None:
        """Act on one client message; problems become `error` events, never exceptions."""
        event_id: str | None = None
        try:
            event = parse_client_event(data)
            event_id = event.event_id
            self._dispatch(event, arrived)
        except ProtocolError as exc:
            if exc.event_id is None:
                exc.event_id = event_id
            self.error(exc)

    def error(self, exc: ProtocolError) -> None:
        metrics.ERRORS.labels(type=exc.code).inc()
        self._send(ErrorEvent(error=ErrorDetail.from_protocol(exc)))

    def _dispatch(self, event: ClientEvent, arrived: float) -> None:
        if isinstance(event, SessionUpdate):
            self._update(event)
        elif isinstance(event, AudioAppend):
            self._append(event.audio, arrived)
        elif event.type == "input_audio_buffer.commit":
            self._commit_requested(arrived)
        elif event.type == "input_audio_buffer.clear":
            self._clear()

    # ---- session.update ---------------------------------------------------------------------

    @staticmethod
    def _param_prefix(flat: bool) -> str:
        return "session.input_audio_transcription" if flat else "session.audio.input.transcription"

    def _render(self, legacy: bool) -> dict:
        return render_session(self.config, self.id, self.expires_at, legacy=legacy)

    def _update(self, event: SessionUpdate) -> None:
        config = apply_update(self.config, event.session)
        flat = "input_audio_transcription" in event.session
        decoding = resolve_decoding(config, self._resolve, self._settings, self._param_prefix(flat))
        old, self.config, self._decoding = self.config, config, decoding
        if config.sample_rate != old.sample_rate:
            self._flush_resampler(time.perf_counter())
        if config.turn_detection != old.turn_detection:
            # An open turn stays open: VAD (or the client, without VAD) ends it.
            self._vad, self._vad_origin = self._new_vad(), self._buffer.end
        older_names = event.type == "transcription_session.update"
        name = "transcription_session.updated" if older_names else "session.updated"
        self._send(SessionEvent(type=name, session=self._render(self._legacy or older_names)))

    def _new_vad(self) -> StreamingVad | None:
        vad = self.config.turn_detection
        if vad is None:
            return None
        return StreamingVad(
            vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms, SAMPLE_RATE
        )

    # ---- audio ------------------------------------------------------------------------------

    def _append(self, audio: str, arrived: float) -> None:
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                "Invalid 'audio': expected base64-encoded PCM16 audio.", param="audio"
            ) from None
        if len(pcm) % 2:
            raise ProtocolError(
                f"Invalid 'audio': PCM16 needs an even number of bytes, got {len(pcm)}.",
                code="invalid_audio",
                param="audio",
            )
        if not pcm:
            return
        seconds = len(pcm) / 2 / self.config.sample_rate
        incoming = round(seconds * SAMPLE_RATE)
        limit_s = self._settings.realtime_max_buffer_s
        limit = round(limit_s * SAMPLE_RATE)
        if self.config.turn_detection is None:
            if len(self._buffer) + incoming > limit:
                raise ProtocolError(
                    f"The input audio buffer holds {self.buffered_seconds():.1f} s; "
                    f"{seconds:.2f} s more would exceed the {limit_s:g} s limit. "
                    "Commit or clear it first.",
                    code="input_audio_buffer_full",
                    param="audio",
                )
        elif self._turn is not None and self._buffer.end - self._turn.start + incoming > limit:
            # Server VAD: a turn that outgrows the buffer is committed and speech goes on in
            # a new turn, so a long monologue loses nothing.
            self._commit(self._buffer.end)
            self._turn = Turn(new_id("item"), self._buffer.end)
        metrics.WEBSOCKET_AUDIO_SECONDS.inc(seconds)
        self._ingest(self._resampler.process(pcm16_to_float(pcm)), arrived)

    def _ingest(self, samples: np.ndarray, arrived: float) -> None:
        self._last_arrival = arrived
        self._buffer.append(samples)
        vad_config = self.config.turn_detection
        if self._vad is None or vad_config is None:
            if self._turn is None and len(self._buffer):
                self._turn = Turn(new_id("item"), self._buffer.start)
        else:
            for kind, t in self._vad.push(samples):
                position = self._vad_origin + round(t * SAMPLE_RATE)
                if kind == "speech_started":
                    self._speech_started(position, vad_config.prefix_padding_ms)
                else:
                    self._speech_stopped(position)
            if self._turn is None:
                # Between turns only the audio a next turn may need (its prefix) is kept.
                keep = round((vad_config.prefix_padding_ms / 1000 + VAD_LAG_S) * SAMPLE_RATE)
                self._buffer.drop_before(self._buffer.end - keep)
        self._maybe_partial()

    def _flush_resampler(self, arrived: float) -> None:
        """Release the resampler's delayed tail into the buffer and start a fresh one."""
        tail = self._resampler.flush()
        self._resampler = StreamResampler(self.config.sample_rate, SAMPLE_RATE)
        if tail.size:
            self._ingest(tail, arrived)

    # ---- turns ------------------------------------------------------------------------------

    def _speech_started(self, position: int, prefix_padding_ms: int) -> None:
        if self._turn is None:
            start = max(
                self._buffer.start, position - round(prefix_padding_ms * SAMPLE_RATE / 1000)
            )
            self._turn = Turn(new_id("item"), start)
        self._send(SpeechStarted(audio_start_ms=_ms(self._turn.start), item_id=self._turn.item_id))

    def _speech_stopped(self, position: int) -> None:
        if self._turn is None:  # cleared while speech went on
            return
        self._send(SpeechStopped(audio_end_ms=_ms(position), item_id=self._turn.item_id))
        self._commit(position)

    def _commit_requested(self, arrived: float) -> None:
        self._flush_resampler(arrived)
        start = self._turn.start if self._turn is not None else self._buffer.start
        held = self._buffer.end - start
        if held < MIN_COMMIT_S * SAMPLE_RATE:
            raise ProtocolError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_S * 1000:.0f}ms of audio, but buffer only has {_ms(max(held, 0))}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        self._commit(self._buffer.end)
        if self._vad is not None and self._vad.in_speech:
            # Committed mid-speech: the rest of the utterance is the next turn.
            self._turn = Turn(new_id("item"), self._buffer.end)

    def _commit(self, end: int) -> None:
        turn = self._turn or Turn(new_id("item"), self._buffer.start)
        audio = self._buffer.slice(turn.start, end)
        self._cancel_partial()
        self._turn = None
        self._buffer.drop_before(end)
        previous, self._last_item_id = self._last_item_id, turn.item_id
        self._send(Committed(item_id=turn.item_id, previous_item_id=previous))
        self._send(ItemCreated.user_audio(turn.item_id, previous))
        task = asyncio.create_task(self._finalize(turn, audio, self._decoding, self._last_final))
        self._last_final = task
        self._finals.add(task)
        task.add_done_callback(self._final_done)

    def _final_done(self, task: asyncio.Task[None]) -> None:
        self._finals.discard(task)
        self._maybe_partial()  # partials held back while the final ran may resume

    def _clear(self) -> None:
        self._cancel_partial()
        self._turn = None
        self._buffer.clear()
        self._resampler = StreamResampler(self.config.sample_rate, SAMPLE_RATE)
        self._vad, self._vad_origin = self._new_vad(), self._buffer.end
        self._send(Cleared())

    # ---- decoding ---------------------------------------------------------------------------

    def _cancel_partial(self) -> None:
        # Its audio is committed or gone: the result would be stale and its slots are better
        # spent on the final decode.
        if self._partial_task is not None:
            self._partial_task.cancel()
            self._partial_task = None

    def _maybe_partial(self) -> None:
        interval = self._settings.realtime_partial_interval_s
        turn = self._turn
        if self._closed or interval <= 0 or turn is None or self._partial_task is not None:
            return
        if self._finals:
            # The previous turn's final is still decoding: it comes first (on a busy CPU a
            # partial would only delay it, and the next tick catches up).
            return
        end = self._buffer.end
        if end - max(turn.decoded_until, turn.start) < round(interval * SAMPLE_RATE):
            return  # no new audio worth a decode: idle sessions queue nothing
        if self._decoding.runtime.queue_depth() > 0:
            # Windows are waiting for the engine: it is saturated. Partials are the work to
            # shed, so that finals and uploads keep their latency; the next append retries.
            return
        if not self._budget.try_acquire():
            return  # the process-wide partial budget is spent: skip this tick
        turn.decoded_until = end
        audio = self._buffer.slice(turn.start, end)
        self._partial_task = asyncio.create_task(
            self._partial(turn, audio, self._last_arrival, self._decoding)
        )
        # A done callback, not a `finally`: a task cancelled before it ever ran skips those.
        self._partial_task.add_done_callback(lambda _: self._budget.release())

    async def _partial(
        self, turn: Turn, audio: np.ndarray, trigger: float, decoding: Decoding
    ) -> None:
        try:
            result = await decoding.runtime.transcribe(
                audio, partial_options(decoding.partial, len(audio) / SAMPLE_RATE)
            )
        except WhisperServeError as exc:
            # Partials are best effort (e.g. queue full): the final decode still comes.
            log.debug("partial decode skipped: %s", exc.message)
            return
        except Exception:
            log.exception("partial decode of %s failed", turn.item_id)
            return
        finally:
            if self._partial_task is asyncio.current_task():
                self._partial_task = None
        if turn is not self._turn or self._closed:
            return
        delta = turn.partials.update(result.text)
        if delta:
            self._send(TranscriptionDelta(item_id=turn.item_id, delta=delta), trigger)
        self._maybe_partial()

    async def _finalize(
        self,
        turn: Turn,
        audio: np.ndarray,
        decoding: Decoding,
        previous: asyncio.Task[None] | None,
    ) -> None:
        failure: ErrorDetail | None = None
        try:
            result = await decoding.runtime.transcribe(
                audio, decoding.final, duration_limit_s=self._settings.max_audio_seconds
            )
        except WhisperServeError as exc:
            failure = _error_detail(exc)
        except Exception:
            log.exception("final decode of %s failed", turn.item_id)
            failure = ErrorDetail(type="server_error", code=None, message="Transcription failed.")
        if previous is not None:
            # Turns decode concurrently but complete in order: clients that simply append
            # each completed transcript (most do) get the conversation in order.
            await asyncio.wait({previous})
        if failure is not None:
            self._send(TranscriptionFailed(item_id=turn.item_id, error=failure))
            return
        rest = turn.partials.remainder(result.text)
        if rest:
            # Completes the delta stream so that, when partials and final agree, the deltas
            # concatenate to the transcript.
            self._send(TranscriptionDelta(item_id=turn.item_id, delta=rest))
        usage = {"type": "duration", "seconds": round(len(audio) / SAMPLE_RATE, 3)}
        self._send(
            TranscriptionCompleted(item_id=turn.item_id, transcript=result.text, usage=usage)
        )

    def _send(self, event: ServerEvent, latency_from: float | None = None) -> None:
        self._emit(event, latency_from)


def _error_detail(exc: WhisperServeError) -> ErrorDetail:
    return ErrorDetail(type=exc.error_type, code=exc.code, message=exc.message, param=exc.param)
