"""One served model: its engine, tokenizer, scheduler and transcriber.

The API layer depends only on `Runtime` / `load_runtime`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from app import metrics
from app.audio.vad import VadOptions
from app.config import Settings
from app.constants import SAMPLE_RATE
from app.decoding.options import TranscribeOptions
from app.decoding.results import TranscriptionResult
from app.decoding.tokenizer import WhisperTokenizer
from app.decoding.transcribe import ModelContext, SegmentCallback, Transcriber
from app.decoding.window import WindowResult, WindowTask
from app.engine.config import EngineConfig
from app.engine.cpu.threads import confine_to_one_thread
from app.engine.options import CudaGraphOptions, EngineOptions
from app.engine.torch_engine import TorchEngine, load_engine
from app.errors import AudioTooLongError
from app.scheduler.decode_loop import DecodeLoop
from app.scheduler.scheduler import Scheduler, SchedulerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions(SchedulerOptions):
    """How one model is served: the engine's, the scheduler's and the runtime's own options.

    Each field has the name of the WHISPER_* setting it comes from (app.config.Settings, whose
    descriptions document them), and from_settings() copies them by that name. The scheduler's
    fields are inherited from SchedulerOptions, so the scheduler takes this object as it is.
    """

    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    compute_dtype: str | None = None  # None: float16 on CUDA, float32 on CPU
    # decoder rows in one step (beam hypotheses count as rows); None: the device's default
    # (app.engine.options.DEFAULT_MAX_ROWS)
    max_batch_size: int | None = None
    int8_cross_kv: bool = False
    fp8_encoder: bool = False  # the encoder's and cross-K/V GEMMs in fp8 (compute capability 8.9+)
    cuda_graphs: bool = True
    # GPU engines decode windows shorter than 30 s (realtime partials' trimmed audio context)
    cuda_trimmed_context: bool = False
    cpu_threads: int | None = 0  # serving sets the engine thread's torch threads (0: torch's default)
    warmup: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """The options WHISPER_* settings give: every field from the setting of its name."""
        return cls(**{option.name: getattr(settings, option.name) for option in fields(cls)})


class Runtime(Protocol):
    name: str
    config: EngineConfig

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def transcribe(
        self, audio: np.ndarray, options: TranscribeOptions, *, duration_limit_s: float | None = None,
        on_segment: SegmentCallback | None = None,
    ) -> TranscriptionResult: ...
    def queue_depth(self) -> int: ...
    def active_rows(self) -> int: ...


_request_ids = itertools.count()


class ModelRuntime:
    """Engine + decode loop + scheduler + transcriber for one engine directory."""

    def __init__(self, name: str, engine: TorchEngine, options: RuntimeOptions) -> None:
        self.name = name
        self.engine = engine
        self.config = engine.config
        self.options = options
        self.tokenizer = WhisperTokenizer.from_engine(engine.engine_dir, engine.config)
        self.scheduler = Scheduler(DecodeLoop(engine, self.tokenizer), model_name=name, options=options)
        self.ready = False
        self._pending_samples = 0  # audio accepted and not yet transcribed (load signal)

    def _context(self, request_id: object) -> ModelContext:
        async def submit(task: WindowTask) -> WindowResult:
            return await self.scheduler.submit(task, request_id)

        async def cross_attention(features: Tensor, tokens: list[int]) -> tuple[Tensor, Tensor]:
            heads = [tuple(h) for h in self.config.alignment_heads]
            future = self.scheduler.run_in_engine_thread(
                lambda: self.engine.cross_attention_weights(torch.tensor([tokens]), features, heads)
            )
            return await asyncio.wrap_future(future)

        return ModelContext(self.tokenizer, self.config.dims.n_mels, self.config.multilingual,
                            submit, cross_attention, trims_audio_context=self.engine.trims_audio_context,
                            feature_device=self.engine.device if self.engine.device.type == "cuda" else None)

    async def start(self) -> None:
        self.scheduler.start()
        if self.options.warmup:
            started = time.perf_counter()
            # one short greedy and one beam window: builds kernels / allocator pools before traffic
            noise = (np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 0.01).astype(np.float32)
            await self._transcribe(noise, TranscribeOptions.greedy(), record=False)
            await self._transcribe(noise, TranscribeOptions(), record=False)
            # loads Silero VAD (on the engine's GPU if any) before the first gated request
            await self._transcribe(noise, TranscribeOptions(vad=VadOptions()), record=False)
            log.info("model %s warmed up in %.1f s", self.name, time.perf_counter() - started)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.to_thread(self.scheduler.stop)

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions, *,
                         duration_limit_s: float | None = None,
                         on_segment: SegmentCallback | None = None) -> TranscriptionResult:
        duration = len(audio) / SAMPLE_RATE
        if duration_limit_s is not None and duration > duration_limit_s:
            raise AudioTooLongError(
                f"Audio is {duration:.1f} s long; the limit is {duration_limit_s:.0f} s.", param="file"
            )
        return await self._transcribe(audio, options, record=True, on_segment=on_segment)

    async def _transcribe(self, audio: np.ndarray, options: TranscribeOptions, record: bool,
                          on_segment: SegmentCallback | None = None) -> TranscriptionResult:
        started = time.perf_counter()
        transcriber = Transcriber(self._context(next(_request_ids)))
        # Counted in samples: a float sum of clip lengths would not return to exactly 0.
        samples = len(audio) if record else 0
        self._pending_samples += samples
        pending = metrics.PENDING_AUDIO_SECONDS.labels(self.name)
        pending.set(self._pending_samples / SAMPLE_RATE)
        try:
            result = await transcriber.transcribe(audio, options, on_segment=on_segment)
        finally:
            self._pending_samples -= samples
            pending.set(self._pending_samples / SAMPLE_RATE)
        if record and result.duration > 0:
            metrics.AUDIO_SECONDS.labels(self.name).inc(result.duration)
            metrics.REAL_TIME_FACTOR.labels(self.name).observe((time.perf_counter() - started) / result.duration)
        return result

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def active_rows(self) -> int:
        return self.scheduler.active_rows()


def load_runtime(engine_dir: str | Path, options: RuntimeOptions, name: str | None = None) -> ModelRuntime:
    """Load an engine directory (raises app.errors.EngineError with a build hint)."""
    engine_dir = Path(engine_dir)
    # Only the engine's decode-loop thread runs torch multi-threaded (app.engine.cpu.threads): the
    # loading thread, and every helper thread after it, use one.
    confine_to_one_thread()
    engine = load_engine(engine_dir, engine_options(options))
    return ModelRuntime(name or engine_dir.name, engine, options)


def engine_options(options: RuntimeOptions) -> EngineOptions:
    """The engine's share of the runtime options."""
    return EngineOptions(device=options.device, compute_dtype=options.compute_dtype, max_rows=options.max_batch_size,
                         int8_cross_kv=options.int8_cross_kv, fp8_encoder=options.fp8_encoder,
                         trimmed_context=options.cuda_trimmed_context,
                         graphs=CudaGraphOptions(enabled=options.cuda_graphs))
