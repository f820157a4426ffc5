"""Scale-out end to end: three `whisper-serve` replicas (tiny.en, CPU) on loopback ports behind
a real nginx running deploy/nginx/whisper.conf.template with the upstream parameters of
deploy/compose/compose.yaml. The test starts and stops every process itself.

- Under load the load signals (whisper_pending_audio_seconds, whisper_saturation) rise on the
  replicas, and fall back to zero once the load is over.
- 16 clients send short clips while one replica gets SIGTERM mid-run and is started again on
  the same port: every request is answered 200 with the right transcript (nginx retries a
  refused connection or a 503 from the draining replica on the next one); the realtime
  session on that replica is closed with 1012 and reconnects to another; sessions on the
  other replicas go on; the restarted replica serves again.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families
from realtime_helpers import Client, clip_pcm24
from test_e2e_server import CLIPS, wer
from test_e2e_server import engine_dir as engine_dir  # noqa: F401 (the fixture, reused)

from bench.server_process import free_port
from bench.server_process import stop as stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "whisper.conf.template"
COMPOSE = REPO_ROOT / "deploy" / "compose" / "compose.yaml"
REPLICAS = 3
CLIENTS = 16
#: Requests of the drain test: at least this many, and until the restarted replica serves.
MIN_REQUESTS = 200
#: The drained replica gets SIGTERM after this many answers.
SIGTERM_AFTER = 40
#: A bound, not a target (three CPU replicas share two cores here, with whatever else runs).
LOAD_DEADLINE_S = 900
SHORT_CLIPS = ("ljspeech-LJ001-0002", "ljspeech-LJ001-0008")  # < 2 s each
STARTUP_TIMEOUT_S = 300


def replica_env(engines_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
    env.update(
        WHISPER_ENGINES_DIR=str(engines_dir),
        WHISPER_MODELS="tiny.en",
        WHISPER_DEVICE="cpu",
        # Three replicas share this machine's cores: one engine thread each.
        WHISPER_CPU_THREADS="1",
        WHISPER_BEAM_SIZE="1",
        # Five decoder rows (the warm-up's beam window needs five): five greedy requests fill
        # a replica (saturation 1).
        WHISPER_MAX_BATCH_SIZE="5",
        WHISPER_MAX_QUEUE_WINDOWS="64",
        WHISPER_REALTIME_PARTIAL_INTERVAL_S="0",
        # The sessions wait silently while the load runs.
        WHISPER_REALTIME_IDLE_TIMEOUT_S="900",
        WHISPER_SHUTDOWN_DRAIN_S="2",
        WHISPER_SHUTDOWN_GRACE_S="10",
        WHISPER_LOG_LEVEL="warning",
    )
    return env


@dataclass
class Replica:
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        out = self.log.with_suffix(f".{self.starts}.log").open("wb")
        args = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*args, "--no-build"], cwd=REPO_ROOT, env=self.env, stdout=out, stderr=out
        )

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.tail()
            try:
                if httpx.get(f"http://{self.address}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"replica {self.address} not ready:\n{self.tail()}")

    def tail(self) -> str:
        log = self.log.with_suffix(f".{self.starts}.log")
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 60)


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a /metrics page (0 when absent)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def read_metric(client: httpx.AsyncClient, replica: Replica, name: str) -> float | None:
    try:
        response = await client.get(f"http://{replica.address}/metrics", timeout=5)
    except httpx.TransportError:
        return None  # stopped or restarting
    return metric(response.text, name)


def upstream_servers(addresses: list[str]) -> str:
    """compose.yaml's `server` lines, with its health-check parameters, for these addresses."""
    compose = yaml.safe_load(COMPOSE.read_text())
    lines = compose["services"]["nginx"]["environment"]["WHISPER_UPSTREAM_SERVERS"]
    parameters = re.match(r"server \S+ ([^;]*);", lines)
    assert parameters is not None, lines
    return " ".join(f"server {a} {parameters.group(1)};" for a in addresses)


@dataclass
class Nginx:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def access_log(self) -> list[str]:
        return (self.directory / "access.log").read_text().splitlines()


def start_nginx(directory: Path, replicas: list[Replica]) -> Nginx:
    nginx = Nginx(free_port(), directory)
    server_conf = string.Template(TEMPLATE.read_text()).safe_substitute(
        WHISPER_LISTEN=nginx.address,
        WHISPER_UPSTREAM_SERVERS=upstream_servers([r.address for r in replicas]),
    )
    (directory / "whisper.conf").write_text(server_conf)
    temp = [f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy")]
    temp += [f"{kind}_temp_path {directory / kind};" for kind in ("fastcgi", "uwsgi", "scgi")]
    # As root, nginx's workers would run as nobody and could not write the temp directories.
    user = "user root;" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"""{user}
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$status $request_method $request_uri $upstream_addr $upstream_status';
    access_log {directory / "access.log"} upstreams;
    {" ".join(temp)}
    include {directory / "whisper.conf"};
}}
"""
    )
    binary = need_nginx()
    command = [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    nginx.process = subprocess.Popen([*command, "-g", "daemon off;"])
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://{nginx.address}/nginx-health", timeout=2).status_code == 200:
                return nginx
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and nginx.process.poll() is None, "nginx did not start"
        time.sleep(0.1)


def need_nginx() -> str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs Debian's nginx)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return binary


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx: Nginx
    references: dict[str, str] = field(default_factory=dict)  # clip id -> transcript

    @property
    def url(self) -> str:
        return f"http://{self.nginx.address}"


@pytest.fixture(scope="module")
def cluster(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # noqa: F811
    need_nginx()
    directory = tmp_path_factory.mktemp("scale-out")
    env = replica_env(engine_dir.parent)
    replicas = [Replica(free_port(), env, directory / f"replica{i}") for i in range(REPLICAS)]
    nginx: Nginx | None = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        nginx = start_nginx(directory, replicas)
        running = Cluster(replicas, nginx)
        for clip_id in SHORT_CLIPS:
            clip = CLIPS[clip_id]
            response = httpx.post(
                f"http://{replicas[0].address}/v1/audio/transcriptions",
                files={"file": (clip.path.name, clip.path.read_bytes())},
                data={"model": "whisper-1"},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            running.references[clip_id] = response.json()["text"]
            assert wer(clip.text, running.references[clip_id]) < 0.2
        yield running
    finally:
        if nginx is not None and nginx.process is not None:
            nginx.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                nginx.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                nginx.process.kill()
                nginx.process.wait()
        for replica in replicas:
            replica.stop()


@dataclass
class Load:
    """Bounded load: CLIENTS tasks send short clips through nginx until told to stop."""

    cluster: Cluster
    answers: list[tuple[int, str, str]] = field(default_factory=list)  # status, clip, text
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, index: int) -> None:
        clips = [CLIPS[c] for c in SHORT_CLIPS]
        bodies = {c.id: c.path.read_bytes() for c in clips}
        async with httpx.AsyncClient(base_url=self.cluster.url, timeout=120) as http:
            n = index
            while not self.stop.is_set():
                clip = clips[n % len(clips)]
                n += 1
                response = await http.post(
                    "/v1/audio/transcriptions",
                    files={"file": (clip.path.name, bodies[clip.id])},
                    data={"model": "whisper-1"},
                )
                text = response.json().get("text", "") if response.status_code == 200 else ""
                self.answers.append((response.status_code, clip.id, text or response.text))

    async def run(self, until: asyncio.Future[None] | None = None, requests: int = 0) -> None:
        clients = [asyncio.create_task(self.client(i)) for i in range(CLIENTS)]
        try:
            async with asyncio.timeout(LOAD_DEADLINE_S):
                if until is not None:
                    await until
                while len(self.answers) < requests:
                    await asyncio.sleep(0.05)
        finally:
            self.stop.set()
            await asyncio.gather(*clients)

    def check(self, references: dict[str, str]) -> None:
        wrong = [a for a in self.answers if a[0] != 200 or a[2] != references[a[1]]]
        assert not wrong, f"{len(wrong)} of {len(self.answers)} answers wrong: {wrong[:5]}"


async def test_load_signals_rise_under_load_and_fall_to_zero(cluster: Cluster) -> None:
    peaks = {"whisper_pending_audio_seconds": 0.0, "whisper_saturation": 0.0}
    load = Load(cluster)

    async def sample() -> None:
        async with httpx.AsyncClient() as http:
            while not load.stop.is_set():
                for replica in cluster.replicas:
                    for name in peaks:
                        value = await read_metric(http, replica, name)
                        peaks[name] = max(peaks[name], value or 0.0)
                await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    await load.run(requests=CLIENTS + 8)
    await sampler
    load.check(cluster.references)
    print(f"load signals: peaks {peaks} over {len(load.answers)} answers")
    # 16 clients on 3 replicas of 5 decoder rows each: rows fill up, audio waits.
    assert peaks["whisper_pending_audio_seconds"] > 2.0, peaks
    assert peaks["whisper_saturation"] >= 0.5, peaks
    async with httpx.AsyncClient() as http:
        for replica in cluster.replicas:
            for name in peaks:
                assert await read_metric(http, replica, name) == 0.0, (replica.address, name)


async def realtime_transcript(client: Client, clip_id: str) -> str:
    pcm = clip_pcm24(CLIPS[clip_id].path)
    await client.send(type="input_audio_buffer.append", audio=base64.b64encode(pcm).decode())
    await client.send(type="input_audio_buffer.commit")
    event = await client.expect("conversation.item.input_audio_transcription.completed", 120)
    return event["transcript"]


MANUAL_SESSION = {
    "type": "transcription",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "whisper-1"},
            "turn_detection": None,
        }
    },
}


async def open_session(cluster: Cluster) -> Client:
    ws = await websockets.connect(
        f"ws://{cluster.nginx.address}/v1/realtime?intent=transcription", open_timeout=30
    )
    client = Client(ws)
    await client.expect("session.created", 30)
    await client.send(type="session.update", session=MANUAL_SESSION)
    await client.expect("session.updated", 30)
    return client


async def sessions_by_replica(cluster: Cluster) -> list[float | None]:
    async with httpx.AsyncClient() as http:
        return [await read_metric(http, r, "whisper_websocket_sessions") for r in cluster.replicas]


async def test_replica_drained_and_restarted_under_load(cluster: Cluster) -> None:
    # One realtime session per replica (least_conn spreads them); the first one's replica is
    # the one drained.
    first = await open_session(cluster)
    counts = await sessions_by_replica(cluster)
    assert counts.count(1.0) == 1, counts
    victim = cluster.replicas[counts.index(1.0)]
    others = [await open_session(cluster), await open_session(cluster)]
    assert await sessions_by_replica(cluster) == [1.0, 1.0, 1.0]

    load = Load(cluster)
    events: dict[str, object] = {}

    async def drain_and_restart() -> None:
        while len(load.answers) < SIGTERM_AFTER:
            await asyncio.sleep(0.05)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGTERM)
        events["sigterm_at_answer"] = len(load.answers)
        # The session on the drained replica is closed with 1012 (service restart) ...
        await asyncio.wait_for(first.ws.wait_closed(), 60)
        events["close_code"] = first.ws.close_code
        # ... and reconnects through nginx to a replica that serves it.
        again = await open_session(cluster)
        events["reconnected"] = await realtime_transcript(again, SHORT_CLIPS[0])
        await again.ws.close()
        exit_code = await asyncio.to_thread(victim.process.wait, 60)
        events["exit_code"] = exit_code
        victim.start()
        await asyncio.to_thread(victim.wait_ready)
        events["restarted_at_answer"] = len(load.answers)
        # Back in rotation: nginx sends it work again once its fail_timeout has passed.
        async with httpx.AsyncClient() as http:
            while not await read_metric(http, victim, "whisper_requests_total"):
                await asyncio.sleep(0.2)

    controller = asyncio.ensure_future(drain_and_restart())
    await load.run(until=controller, requests=MIN_REQUESTS)

    load.check(cluster.references)
    assert len(load.answers) >= MIN_REQUESTS
    assert events["close_code"] == 1012, events
    assert events["exit_code"] in (0, -signal.SIGTERM), events
    assert events["reconnected"] == cluster.references[SHORT_CLIPS[0]], events
    # The sessions on the other replicas were not disturbed.
    for client in others:
        assert (
            await realtime_transcript(client, SHORT_CLIPS[1]) == cluster.references[SHORT_CLIPS[1]]
        )
        await client.ws.close()
    # nginx did the work of hiding the drain: some requests went to the drained replica and
    # were answered by another one (a refused connection, or its 503 while draining).
    retried = [
        line
        for line in cluster.nginx.access_log()
        if "/v1/audio/transcriptions" in line and victim.address in line and ", " in line
    ]
    print(f"drain: {events}; answers {len(load.answers)}; retried by nginx {len(retried)}")
