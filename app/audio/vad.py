"""Voice activity detection with Silero VAD (the `silero-vad` package; its model ships in the
wheel, so nothing is downloaded at run time).

Used to (1) gate every transcription: audio without speech never reaches the decoder, and
only speech regions (padded, see VadOptions) are decoded; (2) cut long audio into <= 30 s
chunks at pauses for the VAD long-form mode; (3) drive turn detection in realtime streaming
(`StreamingVad`, OpenAI Realtime "server_vad" semantics).

Silero VAD scores 32 ms frames (512 samples at 16 kHz, each seen with the 64 samples before
it) with a small convolutional encoder followed by an LSTM. The stock wrapper runs one frame
per call (about 0.8 ms a frame on a CPU core, 90 s for an hour). Here the encoder runs on
blocks of thousands of frames at once and the LSTM cell's weights run as one `nn.LSTM` over the
block, which gives the same probabilities (within 1e-6) at ~1.5 ms per second of audio on one
core of a 2-core AMD EPYC (python -m bench.vad_speed: TorchScript batched 0.08-0.16 s, ONNX Runtime's
sequence model 0.17 s, ONNX per frame 0.39-0.42 s, TorchScript per frame 1.6 s for 60 s of
audio, 2026-12-06). So the TorchScript model is used, batched, for files; it also runs on the
engine's GPU. Realtime streams score the 1-3 frames of each append with ONNX Runtime's sequence
model instead, whose per-call overhead is several times lower (`onnx_sequence_session`).

Frames whose peak is below -80 dBFS are not scored: Silero gives them ~0 (speech attenuated
to a -75 dBFS peak already scores below 0.05), and skipping long runs of them makes an hour
of digital silence cost milliseconds.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from app.constants import CHUNK_LENGTH, SAMPLE_RATE

if TYPE_CHECKING:  # torch loads with the first model, not with the API modules
    import torch

__all__ = ["StreamingVad", "VadEvent", "VadOptions", "chunk_at_pauses", "speech_regions"]

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz
CONTEXT_SAMPLES = 64  # samples of the previous frame each frame is scored with
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE  # 32 ms: the time resolution of every result
#: Frames with a lower peak are not speech (-80 dBFS, about 3 LSB of 16-bit audio).
SILENT_PEAK = 1e-4
#: A run of silent frames this long is skipped (probability 0) and the LSTM restarts after it.
SKIP_SILENT_FRAMES = 16
#: Frames scored per model call offline: bounds the intermediate tensors (~10 MB) for any length.
BLOCK_FRAMES = 4096


@dataclass(frozen=True)
class VadOptions:
    """Speech gating with Silero VAD; faster-whisper's `vad_filter` defaults."""

    #: Silero speech probability at or above which a frame starts speech.
    threshold: float = 0.5
    #: Below this probability a frame counts as silence (None: threshold - 0.15).
    neg_threshold: float | None = None
    #: Speech regions shorter than this are dropped (clicks, coughs).
    min_speech_ms: int = 250
    #: A region ends only after this much silence; shorter pauses stay inside it.
    min_silence_ms: int = 2000
    #: Audio kept on each side of a region, so no word onset or tail is clipped.
    speech_pad_ms: int = 400


def _model_path() -> Path:
    # find_spec locates the package without importing it: silero_vad/__init__ calls
    # torch.set_num_threads(1), which would change the importing thread's torch threads.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The silero-vad package is not installed (pip install silero-vad)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"


class SileroModel:
    """Silero VAD v6 (16 kHz) scoring many frames per call; stateless (state is passed in)."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript loading; it works
            warnings.simplefilter("ignore", DeprecationWarning)
            jit = torch.jit.load(str(_model_path()), map_location=device).eval()
        model = jit._model
        self._stft = model.stft
        self._encoder = model.encoder
        self._head = model.decoder.decoder  # dropout, ReLU, 1x1 conv, sigmoid
        cell = model.decoder.rnn
        self._lstm = torch.nn.LSTM(128, 128, batch_first=True).to(device).eval()
        with torch.no_grad():
            self._lstm.weight_ih_l0.copy_(cell.weight_ih)
            self._lstm.weight_hh_l0.copy_(cell.weight_hh)
            self._lstm.bias_ih_l0.copy_(cell.bias_ih)
            self._lstm.bias_hh_l0.copy_(cell.bias_hh)

    def __call__(
        self, frames: np.ndarray, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
        """frames [n, 576] (context + frame) -> speech probabilities [n] and the LSTM state."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.array(frames, dtype=np.float32)).to(self.device)  # a copy
            encoded = self._encoder(self._stft(x)).squeeze(-1)  # [n, 128]
            hidden, state = self._lstm(encoded.unsqueeze(0), state)
            probs = self._head(hidden[0].unsqueeze(-1)).reshape(-1)
            return probs.float().cpu().numpy(), state


@cache
def _timestamps_from_probs() -> Callable[..., list[dict[str, int]]]:
    """silero_vad's probabilities -> regions state machine. Importing the package sets torch's
    threads to 1 (silero_vad/model.py); the caller's count is put back."""
    import torch

    threads = torch.get_num_threads()
    try:
        from silero_vad.utils_vad import get_speech_timestamps_from_probs
    finally:
        torch.set_num_threads(threads)
    return get_speech_timestamps_from_probs


@cache
def silero_model(device: str = "cpu") -> SileroModel:
    import torch

    return SileroModel(torch.device(device))


@cache
def onnx_sequence_session() -> Any:
    """ONNX Runtime session of Silero's sequence model (a block of frames per call, the LSTM
    state in and out), for streams: on the 1-3 frames a realtime append brings it costs ~8 ms
    per second of audio where the TorchScript path costs ~36 (python -m bench.vad_speed), and it releases the GIL while it runs. One thread; thread-safe."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    path = _model_path().with_name("silero_vad_16k_sequence.onnx")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _device_name(device: torch.device | str | None) -> str:
    return "cpu" if device is None else str(device)


def _frames(audio: np.ndarray, first: int, last: int) -> np.ndarray:
    """Frames [first, last) of `audio`, each with its 64 samples of context: [n, 576]."""
    start = first * FRAME_SAMPLES - CONTEXT_SAMPLES
    end = last * FRAME_SAMPLES
    lead = max(0, -start)
    piece = audio[max(0, start) : end]
    buf = np.zeros(end - start, dtype=np.float32)
    buf[lead : lead + piece.shape[0]] = piece
    width = FRAME_SAMPLES + CONTEXT_SAMPLES
    return np.lib.stride_tricks.as_strided(
        buf, shape=(last - first, width), strides=(FRAME_SAMPLES * 4, 4), writeable=False
    )


def _frame_peaks(audio: np.ndarray) -> np.ndarray:
    """Peak |sample| of every 512-sample frame (the last one may be short), block by block."""
    n = audio.shape[0]
    n_frames = -(-n // FRAME_SAMPLES)
    peaks = np.zeros(n_frames, dtype=np.float32)
    full = n // FRAME_SAMPLES
    step = BLOCK_FRAMES * 16
    for i in range(0, full, step):
        j = min(full, i + step)
        block = audio[i * FRAME_SAMPLES : j * FRAME_SAMPLES].reshape(j - i, FRAME_SAMPLES)
        peaks[i:j] = np.maximum(block.max(axis=1), -block.min(axis=1))
    if n_frames > full:
        tail = audio[full * FRAME_SAMPLES :]
        peaks[full] = np.abs(tail).max()
    return peaks


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index pairs of the True runs in a boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)
    )


def speech_probabilities(
    audio: np.ndarray, *, device: torch.device | str | None = None
) -> np.ndarray:
    """Silero speech probability of every 32 ms frame of 16 kHz mono `audio` (last frame
    zero-padded). Long runs of near-silent frames score 0 without running the model."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    peaks = _frame_peaks(audio)
    probs = np.zeros(peaks.shape[0], dtype=np.float32)
    silent = peaks < SILENT_PEAK
    skip = np.zeros_like(silent)
    for start, end in _runs(silent):
        if end - start >= SKIP_SILENT_FRAMES:
            skip[start:end] = True
    model = None
    for start, end in _runs(~skip):
        model = model or silero_model(_device_name(device))
        state = None  # a fresh LSTM after skipped silence, as at the start of a stream
        for first in range(start, end, BLOCK_FRAMES):
            last = min(end, first + BLOCK_FRAMES)
            probs[first:last], state = model(_frames(audio, first, last), state)
    return probs


def regions_from_probabilities(
    probs: np.ndarray,
    n_samples: int,
    options: VadOptions,
    *,
    max_speech_s: float = math.inf,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges of padded speech regions, from per-frame probabilities.

    Silero's own state machine (`get_speech_timestamps_from_probs`); regions longer than
    max_speech_s (padding included) are cut at their longest inner silence.
    """
    if not np.any(probs >= options.threshold):
        return []  # also spares the state machine's Python loop over an hour of silence
    speeches = _timestamps_from_probs()(
        probs.tolist(),
        sampling_rate=SAMPLE_RATE,
        threshold=options.threshold,
        neg_threshold=options.neg_threshold,
        min_speech_duration_ms=options.min_speech_ms,
        min_silence_duration_ms=options.min_silence_ms,
        speech_pad_ms=options.speech_pad_ms,
        max_speech_duration_s=max_speech_s,
        audio_length_samples=n_samples,
    )
    return [(int(s["start"]), int(s["end"])) for s in speeches if s["end"] > s["start"]]


def speech_regions(
    audio: np.ndarray,
    options: VadOptions | None = None,
    *,
    max_speech_s: float = math.inf,
    device: torch.device | str | None = None,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges of the (padded) speech regions of 16 kHz mono audio."""
    probs = speech_probabilities(audio, device=device)
    return regions_from_probabilities(
        probs, len(audio), options or VadOptions(), max_speech_s=max_speech_s
    )


def merge_into_chunks(regions: list[tuple[int, int]], max_samples: int) -> list[tuple[int, int]]:
    """Join consecutive regions into chunks spanning at most `max_samples` (the pauses between
    them included); a region longer than that on its own is cut into pieces."""
    chunks: list[tuple[int, int]] = []
    for start, end in regions:
        if chunks and end - chunks[-1][0] <= max_samples:
            chunks[-1] = (chunks[-1][0], end)
            continue
        while end - start > max_samples:
            chunks.append((start, start + max_samples))
            start += max_samples
        chunks.append((start, end))
    return chunks


def chunk_at_pauses(
    audio: np.ndarray,
    *,
    max_chunk_s: float = CHUNK_LENGTH,
    options: VadOptions | None = None,
    device: torch.device | str | None = None,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most max_chunk_s each, covering every speech region
    and leaving out the silences between chunks. All-silent audio gives []."""
    max_samples = int(max_chunk_s * SAMPLE_RATE)
    regions = speech_regions(audio, options, max_speech_s=max_chunk_s, device=device)
    return merge_into_chunks(regions, max_samples)


class VadEvent(NamedTuple):
    """("speech_started" | "speech_stopped", seconds since the stream began)."""

    kind: str
    t: float


class StreamingVad:
    """Incremental speech start/stop detection for realtime audio (OpenAI server_vad).

    `threshold` is Silero's speech probability (0..1): a frame at or above it is speech;
    once in speech, frames below threshold - 0.15 count as silence (Silero's hysteresis).

    Events: ("speech_started", t) where t is the start of the first speech frame, reported
    once `min_speech_ms` of speech has been seen; ("speech_stopped", t) once
    `silence_duration_ms` of silence follows speech, where t = end of the last speech frame
    + silence_duration_ms (the point where it was decided, as OpenAI's `audio_end_ms`).
    `prefix_padding_ms` is kept for the consumer: audio to include before a start event.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 500,
        sample_rate: int = SAMPLE_RATE,
        *,
        min_speech_ms: int = 64,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, got {threshold}")
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"StreamingVad takes {SAMPLE_RATE} Hz audio, got {sample_rate}")
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.sample_rate = sample_rate
        self._session = onnx_sequence_session()
        self._hidden = np.zeros((1, 1, 128), dtype=np.float32)
        self._cell = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._min_speech_frames = max(1, round(min_speech_ms / 1000 / FRAME_S))
        self._silence_frames = max(1, math.ceil(silence_duration_ms / 1000 / FRAME_S))
        self._frames_done = 0
        self.in_speech = False
        self._speech_run = 0  # consecutive speech frames while not in speech
        self._silence_since: int | None = None  # first frame of the current silence in speech
        self.speech_start_s: float | None = None
        self.last_speech_end_s: float | None = None

    @property
    def prefix_padding_s(self) -> float:
        return self.prefix_padding_ms / 1000.0

    @property
    def time_s(self) -> float:
        """Audio time consumed so far (complete frames only)."""
        return self._frames_done * FRAME_S

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed mono float samples at 16 kHz; returns events completed by them."""
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).ravel()])
        n_frames = data.shape[0] // FRAME_SAMPLES
        self._pending = data[n_frames * FRAME_SAMPLES :].copy()
        if n_frames == 0:
            return []
        with_context = np.concatenate([self._context, data[: n_frames * FRAME_SAMPLES]])
        self._context = with_context[-CONTEXT_SAMPLES:].copy()
        frames = np.lib.stride_tricks.as_strided(
            with_context,
            shape=(n_frames, FRAME_SAMPLES + CONTEXT_SAMPLES),
            strides=(FRAME_SAMPLES * 4, 4),
            writeable=False,
        )
        probs, self._hidden, self._cell = self._session.run(
            ["speech_probs", "hn", "cn"],
            {"input": np.ascontiguousarray(frames), "h": self._hidden, "c": self._cell},
        )
        return [event for event in map(self._step, probs.reshape(-1).tolist()) if event is not None]

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open speech turn at the current time."""
        self._pending = np.zeros(0, dtype=np.float32)
        if not self.in_speech:
            return []
        self.in_speech = False
        self._silence_since = None
        return [VadEvent("speech_stopped", self.time_s)]

    def _step(self, prob: float) -> VadEvent | None:
        index = self._frames_done
        self._frames_done += 1
        if not self.in_speech:
            self._speech_run = self._speech_run + 1 if prob >= self.threshold else 0
            if self._speech_run >= self._min_speech_frames:
                self.in_speech = True
                self._speech_run = 0
                self._silence_since = None
                self.speech_start_s = (index + 1 - self._min_speech_frames) * FRAME_S
                self.last_speech_end_s = (index + 1) * FRAME_S
                return VadEvent("speech_started", self.speech_start_s)
            return None
        if prob >= self.threshold:
            self._silence_since = None
            self.last_speech_end_s = (index + 1) * FRAME_S
        elif prob < self.neg_threshold and self._silence_since is None:
            self._silence_since = index
        if (
            self._silence_since is not None
            and index + 1 - self._silence_since >= self._silence_frames
        ):
            self.in_speech = False
            self._silence_since = None
            return VadEvent("speech_stopped", (index + 1) * FRAME_S)
        return None
