"""End to end: speech gating on a real `whisper-serve` (tiny.en on this CPU).

Audio without speech (digital silence, white noise, a tone; 10 minutes of 44.1 kHz stereo
silence) returns no words in any response format, over SSE, and on the realtime WebSocket;
speech separated by long silences keeps its words and their timestamps point at the
original audio. The files are made here; bench/vad.py measures the same on the shared data.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets.sync.client as ws_client
from test_e2e_server import CLIPS, JFK, Server, wer
from test_e2e_server import engine_dir as engine_dir  # noqa: F401 (the fixtures, reused)
from test_e2e_server import server as server  # noqa: F401

from app.audio.pcm import float_to_pcm16

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SR = 16_000
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def flac(audio: np.ndarray, rate: int = SR) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def nonspeech(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    t = np.arange(30 * SR) / SR
    if kind == "silence":
        return flac(np.zeros(30 * SR, np.float32))
    if kind == "white-noise":
        return flac(rng.uniform(-0.3, 0.3, 30 * SR).astype(np.float32))
    if kind == "tone":
        return flac((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    # ten minutes of digital silence, 44.1 kHz stereo (the hour is in bench/vad.py)
    return flac(np.zeros((600 * 44_100, 2), np.int16), 44_100)


def post(server: Server, data: bytes, **fields: str | list[str]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("audio.flac", data, "audio/flac")},
        data={"model": "whisper-1", **fields},
        timeout=300,
    )


def assert_no_words(response_format: str, response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    if response_format == "json":
        assert response.json()["text"] == ""
    elif response_format == "verbose_json":
        body = response.json()
        assert body["text"] == "" and body["segments"] == []
    elif response_format == "text":
        assert response.text.strip() == ""
    elif response_format == "srt":
        assert "-->" not in response.text
    else:
        assert "-->" not in response.text and response.text.startswith("WEBVTT")


@pytest.mark.parametrize("kind", ["silence", "white-noise", "tone", "silence-10min-44k-stereo"])
def test_no_speech_gives_no_words_in_any_format(server: Server, kind: str) -> None:
    data = nonspeech(kind)
    for response_format in FORMATS:
        assert_no_words(response_format, post(server, data, response_format=response_format))
    streamed = post(server, data, stream="true")
    events = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")
    ]
    assert [e["type"] for e in events] == ["transcript.text.done"] and events[0]["text"] == ""


def test_realtime_commit_of_noise_completes_empty(server: Server) -> None:
    noise = np.random.default_rng(1).uniform(-0.3, 0.3, 3 * 24_000).astype(np.float32)
    with ws_client.connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"turn_detection": None}},
                    },
                }
            )
        )
        pcm = float_to_pcm16(noise)
        for offset in range(0, len(pcm), 4800):
            chunk = base64.b64encode(pcm[offset : offset + 4800]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        seen = []
        while True:
            event = json.loads(ws.recv(timeout=120))
            seen.append(event["type"])
            assert event["type"] != "error", event
            if event["type"].endswith("input_audio_transcription.completed"):
                assert event["transcript"] == ""
                break
        assert not any(kind.endswith(".delta") for kind in seen), seen


def test_speech_between_long_silences_keeps_words_and_times(server: Server) -> None:
    jfk = CLIPS[JFK]
    clips = [jfk, *(c for c in CLIPS.values() if c.id != JFK)]
    audios = [sf.read(c.path, dtype="float32")[0] for c in clips]
    gaps = [25.0, 40.0]
    parts, spans, position = [], [], 0.0
    for i, audio in enumerate(audios):
        parts.append(audio)
        spans.append((position, position + len(audio) / SR))
        position += len(audio) / SR
        if i < len(gaps):
            parts.append(np.zeros(int(gaps[i] * SR), np.float32))
            position += gaps[i]
    joined = np.concatenate(parts)
    reference = " ".join(c.text for c in clips)
    plain = post(server, flac(np.concatenate(audios)), response_format="json").json()["text"]
    body = post(
        server,
        flac(joined),
        response_format="verbose_json",
        **{"timestamp_granularities[]": ["word", "segment"]},
    ).json()
    assert wer(reference, body["text"]) <= wer(reference, plain) + 0.02
    assert body["duration"] == pytest.approx(position, abs=0.01)
    assert body["words"]
    for word in body["words"]:  # each word lies within the clip it was said in (+-0.5 s)
        assert any(a - 0.5 <= word["start"] and word["end"] <= b + 0.5 for a, b in spans), word
    for segment in body["segments"]:
        assert not any(
            b + 0.5 < segment["start"] < c - 0.5
            for (_, b), (c, _) in zip(spans, spans[1:], strict=False)
        ), segment
