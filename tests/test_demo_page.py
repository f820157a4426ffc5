"""The browser demo at /: headless Chromium with a fake microphone playing a fixture clip.

Chromium is driven over its DevTools protocol (the `websockets` package, no extra
dependency): it loads /?autostart=1, its fake capture device plays the clip into
getUserMedia, the page streams it to /v1/realtime, and the test waits for the final
transcripts in the DOM, takes a screenshot, and checks the text (normalised WER; the fake
microphone path resamples, so word-exact equality is not expected).

`UPDATE_DEMO_SCREENSHOT=1 pytest tests/test_demo_page.py` also refreshes docs/demo.png.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import REPO_ROOT
from realtime_helpers import real_server
from test_e2e_server import CLIPS, JFK, Server, wer
from test_e2e_server import engine_dir as engine_dir  # noqa: F401 (the fixture, reused)

from app.audio.decode import decode_audio
from app.audio.pcm import float_to_pcm16

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TRANSCRIPT_TIMEOUT_S = 180
WER_LIMIT = 0.15


@pytest.fixture(scope="module")
def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    with real_server(engine_dir, log) as running:
        yield running


def write_wav(path: Path, source: Path, rate: int = 48000, tail_silence_s: float = 60.0) -> None:
    # Trailing silence: once its file ends, Chromium's fake device plays a steady -26 dBFS
    # signal, which server VAD rightly takes for a voice that never pauses.
    audio = decode_audio(source.read_bytes(), sample_rate=rate)
    audio = np.concatenate([audio, np.zeros(round(tail_silence_s * rate), dtype=np.float32)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(float_to_pcm16(audio))


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page's WebSocket."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive in between; only our answer matters
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def launch_chromium(profile: Path, wav: Path) -> subprocess.Popen:
    assert CHROMIUM is not None
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--window-size=1000,720",
        "about:blank",
    ]
    # Its own process group, so teardown ends Chromium's helper processes with it.
    return subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=(profile.parent / "chromium.log").open("wb"),
        start_new_session=True,
    )


def devtools_page_url(profile: Path, process: subprocess.Popen) -> str:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            log = (profile.parent / "chromium.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"Chromium did not start its DevTools endpoint:\n{log}")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


FINALS_JS = """JSON.stringify({
  finals: [...document.querySelectorAll('.turn.done .final')].map(e => e.textContent),
  partials: [...document.querySelectorAll('.turn .partial')].map(e => e.textContent),
  status: document.getElementById('status').textContent,
  statusIsError: document.getElementById('status').classList.contains('error'),
})"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_demo_page_transcribes_the_fake_microphone(server: Server, tmp_path: Path) -> None:
    clip = CLIPS[JFK]
    wav = tmp_path / "microphone.wav"
    write_wav(wav, clip.path)
    profile = tmp_path / "profile"
    profile.mkdir()
    process = launch_chromium(profile, wav)
    try:
        async with websockets.connect(devtools_page_url(profile, process), max_size=None) as ws:
            page = DevTools(ws)
            await page.call("Page.enable")
            await page.call("Runtime.enable")
            await page.call("Page.navigate", url=f"{server.url}/?autostart=1")
            deadline = time.monotonic() + TRANSCRIPT_TIMEOUT_S
            state: dict[str, Any] = {}
            while time.monotonic() < deadline:
                state = json.loads(await page.evaluate(FINALS_JS) or "{}")
                text = " ".join(state.get("finals", []))
                if text and wer(clip.text, text) < WER_LIMIT:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.5)  # let the last render land before the picture
            shot = await page.call("Page.captureScreenshot", format="png")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    png = base64.b64decode(shot["data"])
    (tmp_path / "demo.png").write_bytes(png)
    if os.environ.get("UPDATE_DEMO_SCREENSHOT") == "1":
        # Opt-in: a test run should not rewrite a tracked file (docs/realtime.md's picture).
        (REPO_ROOT / "docs" / "demo.png").write_bytes(png)
    text = " ".join(state.get("finals", []))
    score = wer(clip.text, text)
    print(
        f"\n[demo] finals: {state.get('finals')}\n[demo] WER {score:.1%}; screenshot {tmp_path / 'demo.png'}"
    )
    assert state.get("statusIsError") is False, state
    assert score < WER_LIMIT, state
