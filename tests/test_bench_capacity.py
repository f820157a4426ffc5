"""The capacity benchmarks' logic (bench/realtime.py, bench/hour.py) without a server."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from bench import realtime
from bench.concurrency import Clip
from bench.realtime import Limits, Snapshot, StreamResult, run_ramp, summarize

BUCKETS = (0.5, 1.0, 2.5, math.inf)


def buckets(*counts: float) -> dict[float, float]:
    """Cumulative histogram from per-bucket counts."""
    return dict(zip(BUCKETS, np.cumsum(counts).tolist(), strict=True))


def session(
    i: int, final_s: float = 0.5, *, same: bool = True, error: str | None = None
) -> StreamResult:
    return StreamResult(
        i,
        "c",
        partial_text="so we went",
        partials=2,
        first_partial_s=0.4,
        final="So we went home." if error is None else None,
        final_latency_s=final_s if error is None else None,
        rest="So we went home." if same else "So we went out.",
        error=error,
    )


def step(
    sessions: list[StreamResult], partials: dict[float, float], engine_s: float = 2.0
) -> realtime.StepReport:
    before = Snapshot(buckets(0, 0, 0, 0), engine_s=10.0, windows=100)
    after = Snapshot(partials, engine_s=10.0 + engine_s, windows=140)
    return summarize(len(sessions), 2, sessions, 10.0, before, after, Limits())


def test_a_step_within_every_limit_passes_and_reports_cost_and_agreement() -> None:
    report = step([session(i) for i in range(20)], buckets(90, 8, 2, 0))
    assert report.passed, report.reasons
    assert report.deltas == 100 and report.partial_within_limit == pytest.approx(0.98)
    assert report.partial_p50_s == pytest.approx(0.5 * 50 / 90)
    assert (
        report.windows == 40 and report.windows_per_s == 4.0 and report.engine_ms_per_window == 50.0
    )
    assert report.engine_busy == pytest.approx(0.2)
    assert report.kept_share == 1.0 and report.covered_share == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    ("sessions", "partials", "reason"),
    [
        ([session(i) for i in range(20)], buckets(80, 10, 10, 0), "partial p95"),
        (
            [session(i, final_s=2.0 if i < 2 else 0.5) for i in range(20)],
            buckets(100, 0, 0, 0),
            "final p95",
        ),
        (
            [session(0, same=False)] + [session(i) for i in range(1, 20)],
            buckets(100, 0, 0, 0),
            "differ from REST",
        ),
        (
            [session(0, error="refused")] + [session(i) for i in range(1, 20)],
            buckets(100, 0, 0, 0),
            "error",
        ),
    ],
)
def test_a_step_fails_on_each_limit(
    sessions: list[StreamResult], partials: dict[float, float], reason: str
) -> None:
    report = step(sessions, partials)
    assert not report.passed and any(reason in r for r in report.reasons), report.reasons


def test_a_load_generator_that_falls_behind_is_named() -> None:
    sessions = [session(i) for i in range(10)]
    for s in sessions:
        s.client_lag_s = 1.0
    assert any("load generator" in r for r in step(sessions, buckets(10, 0, 0, 0)).reasons)


def test_the_ramp_stops_after_the_first_failing_step_and_keeps_the_largest_pass() -> None:
    ran: list[int] = []

    def run_step(n: int) -> realtime.StepReport:
        ran.append(n)
        report = step([session(i) for i in range(4)], buckets(4, 0, 0, 0))
        report.streams, report.passed = n, n <= 200
        return report

    steps = run_ramp([50, 100, 200, 400, 700], run_step)
    assert ran == [50, 100, 200, 400] and realtime.capacity(steps) == 200
    ran.clear()
    assert realtime.capacity(run_ramp([50, 400, 700], run_step, keep_going=True)) == 50 and ran == [
        50,
        400,
        700,
    ]
    assert realtime.capacity([]) == 0


def test_streams_are_dealt_to_processes_with_seeded_offsets() -> None:
    shares = realtime.plan(10, 3, 4, stagger_s=2.0)
    assert [len(s) for s in shares] == [4, 3, 3]
    flat = sorted(s for share in shares for s in share)
    assert [i for i, _, _ in flat] == list(range(10)) and [c for _, c, _ in flat] == [
        i % 4 for i in range(10)
    ]
    assert all(0 <= offset < 2.0 for _, _, offset in flat)
    assert shares == realtime.plan(10, 3, 4, stagger_s=2.0)  # the same every run
    assert len(realtime.plan(2, 8, 4, 1.0)) == 2  # never more processes than streams


def test_ramp_and_env_arguments_are_checked() -> None:
    assert realtime.parse_ramp("2,4") == [2, 4]
    for bad in ("4,2", "0,5", "5,5", "x", "3000"):
        with pytest.raises(argparse.ArgumentTypeError):
            realtime.parse_ramp(bad)
    assert realtime.parse_args(["--streams", "8"]).ramp == [8]
    assert realtime.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    env = realtime.capacity_env(2000)
    assert int(env["WHISPER_REALTIME_MAX_PARTIAL_DECODES"]) >= 2000
    assert int(env["WHISPER_MAX_QUEUE_WINDOWS"]) >= 2000


def test_metrics_are_read_for_one_model() -> None:
    text = (
        "\n".join(
            [
                "# TYPE whisper_partial_latency_seconds histogram",
                'whisper_partial_latency_seconds_bucket{le="1.0"} 3.0',
                'whisper_partial_latency_seconds_bucket{le="+Inf"} 4.0',
                "whisper_partial_latency_seconds_count 4.0",
                "whisper_partial_latency_seconds_sum 2.0",
                "# TYPE whisper_encode_seconds histogram",
                'whisper_encode_seconds_sum{model="base"} 1.5',
                'whisper_encode_seconds_count{model="base"} 3.0',
                'whisper_encode_seconds_sum{model="tiny.en"} 9.0',
                "# TYPE whisper_decode_step_seconds histogram",
                'whisper_decode_step_seconds_sum{model="base"} 0.5',
                "# TYPE whisper_windows counter",
                'whisper_windows_total{model="base"} 7.0',
            ]
        )
        + "\n"
    )
    snap = realtime.snapshot(text, "base")
    assert snap.partial_buckets == {1.0: 3.0, math.inf: 4.0}
    assert snap.engine_s == 2.0 and snap.windows == 7.0
    assert realtime.share_within({}, snap.partial_buckets, 1.0) == 0.75


def test_agreement_counts_words_loosely() -> None:
    assert realtime.words("So, we WENT home...") == ["so", "we", "went", "home"]
    assert realtime.kept_words("so we went", "So we went home.") == 3
    assert realtime.kept_words("so we want", "So we went home.") == 2


def test_speech_start_and_clip_choice() -> None:
    rate = 24000
    audio = np.zeros(rate * 2, dtype=np.float32)
    audio[int(0.75 * rate) :] = 0.3 * np.sin(np.arange(len(audio) - int(0.75 * rate)) / 5)
    assert realtime.speech_start(audio, rate) == pytest.approx(0.7)
    clips = [Clip(str(i), Path("x"), d, "") for i, d in enumerate([3.0, 20.0, 5.0, 9.0])]
    assert [c.id for c in realtime.pick_clips(clips, 2, 0.0, 10.0)] == ["0", "2"]


def test_an_hour_is_whole_clips_in_order_with_the_reference_text(tmp_path: Path) -> None:
    import soundfile

    from bench.hour import build_long_audio

    clips = []
    for i, seconds in enumerate((1.0, 2.0)):
        path = tmp_path / f"{i}.wav"
        soundfile.write(path, np.full(int(16000 * seconds), 0.1 * (i + 1), dtype=np.float32), 16000)
        clips.append(Clip(str(i), path, seconds, f"text {i}"))
    long = build_long_audio(clips, minutes=5 / 60)  # 1.5 + 2.5 + 1.5 s: 5 s reached
    assert long.clips == 3 and long.seconds == pytest.approx(5.5)
    assert long.reference == "text 0 text 1 text 0"
    samples, rate = soundfile.read(io_bytes(long.flac), dtype="float32")
    assert rate == 16000 and len(samples) == int(5.5 * 16000)


def io_bytes(data: bytes):  # type: ignore[no-untyped-def]
    import io

    return io.BytesIO(data)
