"""End to end: a real `whisper-serve` (uvicorn, real tiny.en engine) on a loopback port.

Talks to it with httpx, raw sockets and the official OpenAI SDK, and checks transcripts of
the fixture clips in tests/data/ against their references (normalised WER).
"""

from __future__ import annotations

import asyncio
import csv
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO_ROOT, TEST_DATA

from bench.server_process import ServerStartError, free_port, serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ENGINE = "tiny.en"
#: Small on purpose, so the 413 test has little to send (the fixtures are < 300 kB).
UPLOAD_LIMIT_MB = 2
STARTUP_TIMEOUT_S = 300
JFK = "jfk-inaugural-1961-excerpt"


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path
    duration: float
    text: str


def _clips() -> dict[str, Clip]:
    with (TEST_DATA / "manifest.tsv").open(newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return {
            r["id"]: Clip(r["id"], TEST_DATA / r["file"], float(r["duration"]), r["text"])
            for r in rows
        }


CLIPS = _clips()


def wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return jiwer.wer(normalize(reference), normalize(hypothesis))


@pytest.fixture(scope="session")
def engine_dir() -> Path:
    engine = REPO_ROOT / "engines" / ENGINE
    if not (engine / "config.json").is_file():
        subprocess.run([sys.executable, "build_engines.py"], cwd=REPO_ROOT, check=True)
    return engine


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log: Path


def _server_env(engines_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(
        WHISPER_ENGINES_DIR=str(engines_dir),
        WHISPER_MODELS=ENGINE,
        WHISPER_MAX_UPLOAD_MB=str(UPLOAD_LIMIT_MB),
        WHISPER_LOG_LEVEL="info",
        **extra,
    )
    return env


@pytest.fixture(scope="session")
def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("wb") as out:
        try:
            with serve(_server_env(engine_dir.parent), output=out, log=log,
                       startup_timeout_s=STARTUP_TIMEOUT_S) as running:
                yield Server(running.url, running.port, running.process, log)
        except ServerStartError as exc:
            pytest.fail(str(exc))
    assert running.stopped_gracefully, f"server ignored SIGTERM:\n{log.read_text()[-4000:]}"
    # A graceful stop drains, runs the lifespan shutdown (runtime.stop()) and exits; uvicorn
    # re-raises the SIGTERM it caught once done, so -SIGTERM is a clean exit too.
    output = log.read_text()
    assert running.process.returncode in (0, -signal.SIGTERM), output[-4000:]
    assert "Application shutdown complete" in output, output[-4000:]


@pytest.fixture(scope="session")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)


def transcribe(sdk: openai.OpenAI, clip: Clip, **kwargs: object) -> object:
    with clip.path.open("rb") as audio:
        return sdk.audio.transcriptions.create(model="whisper-1", file=audio, **kwargs)


# --- probes and models -----------------------------------------------------------------------


def test_probes_and_models(server: Server, sdk: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    assert [m.id for m in sdk.models.list()] == [ENGINE, "whisper-1"]
    assert sdk.models.retrieve(ENGINE).id == ENGINE


# --- transcripts in every format -------------------------------------------------------------


def test_json_transcripts_match_references(sdk: openai.OpenAI) -> None:
    references, hypotheses = [], []
    for clip in CLIPS.values():
        result = transcribe(sdk, clip)
        references.append(clip.text)
        hypotheses.append(result.text)
    # tiny.en makes the odd small error; the fixture set as a whole must stay under 10 % WER.
    assert wer(" ".join(references), " ".join(hypotheses)) < 0.10, hypotheses
    jfk = hypotheses[list(CLIPS).index(JFK)]
    assert wer(CLIPS[JFK].text, jfk) < 0.10, jfk


def test_text_srt_vtt(sdk: openai.OpenAI) -> None:
    clip = CLIPS[JFK]
    text = transcribe(sdk, clip, response_format="text")
    assert isinstance(text, str) and wer(clip.text, text) < 0.10

    srt = transcribe(sdk, clip, response_format="srt")
    blocks = [b for b in srt.strip().split("\n\n") if b]
    assert blocks[0].startswith("1\n") and " --> " in blocks[0]
    assert "," in blocks[0].splitlines()[1]  # SRT uses a comma before milliseconds
    srt_text = " ".join(" ".join(b.splitlines()[2:]) for b in blocks)
    assert wer(clip.text, srt_text) < 0.10

    vtt = transcribe(sdk, clip, response_format="vtt")
    assert vtt.startswith("WEBVTT")
    assert " --> " in vtt and "." in vtt.split(" --> ")[0][-4:]


def test_verbose_json_with_word_and_segment_timestamps(sdk: openai.OpenAI) -> None:
    clip = CLIPS[JFK]
    result = transcribe(
        sdk, clip, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert result.duration == pytest.approx(clip.duration, abs=0.1)
    assert result.language in ("en", "english")
    assert wer(clip.text, result.text) < 0.10

    assert result.segments, "no segments"
    for seg in result.segments:
        assert 0 <= seg.start <= seg.end <= clip.duration + 0.5
    assert [s.id for s in result.segments] == list(range(len(result.segments)))

    words = result.words
    assert words and len(words) >= len(clip.text.split()) - 2
    for a, b in zip(words, words[1:], strict=False):
        assert a.start <= a.end <= b.start + 0.01, (a, b)
    assert words[-1].end <= clip.duration + 0.5
    spoken = " ".join(w.word for w in words)
    assert wer(clip.text, spoken) < 0.10
    # "ask not" is spoken around the middle of the clip, not at either end.
    ask = next(w for w in words if w.word.strip().lower().startswith("ask"))
    assert 2.0 < ask.start < 9.0


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK flags translations
def test_translation_endpoint(sdk: openai.OpenAI) -> None:
    clip = CLIPS[JFK]
    with clip.path.open("rb") as audio:
        result = sdk.audio.translations.create(model="whisper-1", file=audio)
    assert wer(clip.text, result.text) < 0.10  # English-only model: English in, English out


def test_concurrent_requests_agree(server: Server) -> None:
    clip = CLIPS["ljspeech-LJ001-0002"]
    data = clip.path.read_bytes()

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

            async def one() -> str:
                response = await client.post(
                    "/v1/audio/transcriptions",
                    files={"file": (clip.path.name, data, "audio/flac")},
                    data={"model": ENGINE},
                )
                response.raise_for_status()
                return response.json()["text"]

            return await asyncio.gather(*(one() for _ in range(8)))

    texts = asyncio.run(run())
    assert len(set(texts)) == 1, texts  # batching with other requests must not change output
    assert wer(clip.text, texts[0]) < 0.25


# --- errors from the real server -------------------------------------------------------------


def test_sdk_error_classes(sdk: openai.OpenAI) -> None:
    clip = CLIPS["ljspeech-LJ001-0008"]
    with pytest.raises(openai.NotFoundError) as not_found, clip.path.open("rb") as audio:
        sdk.audio.transcriptions.create(model="large-v9", file=audio)
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"

    with pytest.raises(openai.BadRequestError) as bad, clip.path.open("rb") as audio:
        sdk.audio.transcriptions.create(model="whisper-1", file=audio, language="fr")
    assert bad.value.param == "language"


def test_unsupported_media_is_415(server: Server) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1024
    response = httpx.post(
        f"{server.url}/v1/audio/transcriptions",
        files={"file": ("image.png", png, "image/png")},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_chunked_upload_is_refused_while_streaming(server: Server) -> None:
    """Send a chunked body that never ends; the 413 must arrive before we stop sending."""
    boundary = "e2eboundary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    request = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"\x00" * (256 * 1024)
    limit_chunks = 4 * UPLOAD_LIMIT_MB * 3  # three times the limit, if nobody stops us
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request + f"{len(head):x}\r\n".encode() + head + b"\r\n")
        while sent < limit_chunks:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        response = b""
        while b"\r\n\r\n" not in response:
            part = sock.recv(65536)
            if not part:
                break
            response += part
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    # Refused just past the limit (the body never had an end to wait for).
    assert sent < limit_chunks
    assert sent * len(chunk) <= (UPLOAD_LIMIT_MB + 2) * 1024 * 1024


def test_client_disconnect_cancels_the_work(server: Server) -> None:
    import io

    import numpy as np
    import soundfile as sf

    # 44 s of speech (1.4 MB, under the 2 MB upload limit): long enough that the client is
    # gone well before the result.
    speech, rate = sf.read(CLIPS[JFK].path, dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, np.tile(speech, 4), rate, format="WAV", subtype="PCM_16")
    body = httpx.Request(
        "POST", server.url, files={"file": ("long.wav", buffer.getvalue(), "audio/wav")}
    )
    payload = body.read()
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: {body.headers['content-type']}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + payload)
        time.sleep(0.5)  # the server has the body and is transcribing
    cancelled = 'whisper_requests_total{endpoint="/v1/audio/transcriptions",status="499"}'
    deadline = time.monotonic() + 30
    while cancelled not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.2)
    assert "work cancelled" in server.log.read_text()


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_after_traffic(server: Server, sdk: openai.OpenAI) -> None:
    transcribe(sdk, CLIPS["ljspeech-LJ001-0008"])
    text = httpx.get(f"{server.url}/metrics").text
    assert 'whisper_requests_total{endpoint="/v1/audio/transcriptions",status="200"}' in text
    audio = [
        line
        for line in text.splitlines()
        if line.startswith('whisper_audio_seconds_total{model="tiny.en"}')
    ]
    assert audio and float(audio[0].split()[-1]) > 0
    assert "whisper_batch_size_bucket" in text
    assert "whisper_request_latency_seconds_bucket" in text


# --- startup failure -------------------------------------------------------------------------


def test_missing_engine_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--port", str(free_port()), "--no-build"],
        cwd=REPO_ROOT,
        env=_server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Cannot start" in output and "build_engines.py" in output, output[-3000:]


# --- shutdown --------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_work_and_answers_503_meanwhile(
    engine_dir: Path, tmp_path: Path
) -> None:
    """8 transcriptions in flight at SIGTERM all finish; a request in the drain gets 503."""
    import threading

    log = tmp_path / "server.log"
    env = _server_env(engine_dir.parent, WHISPER_SHUTDOWN_DRAIN_S="3")
    clip = CLIPS[JFK].path.read_bytes()
    answers: list[int | str] = []
    with log.open("wb") as out, serve(env, output=out, log=log,
                                      startup_timeout_s=STARTUP_TIMEOUT_S) as running:

        def one() -> None:
            try:
                response = httpx.post(f"{running.url}/v1/audio/transcriptions",
                                      files={"file": ("jfk.flac", clip)}, timeout=300)
                answers.append(response.status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)  # all uploaded (a 176 kB file each) and being transcribed
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(f"{running.url}/v1/audio/transcriptions",
                          files={"file": ("jfk.flac", clip)}, timeout=30)
        for thread in threads:
            thread.join(timeout=300)
        status = running.process.wait(timeout=60)
    assert answers == [200] * 8, log.read_text()[-3000:]
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["retry-after"]
    assert status == 0, log.read_text()[-3000:]
