"""Run the service in a child process on a free loopback port: for benchmarks and e2e tests.

One implementation of "start `python -m app.cli`, wait until /ready says 200, stop it with
SIGTERM (graceful drain) and kill it only if it ignores that".
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time (the message holds its log tail)."""


@dataclass
class ServerProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    #: True when the server stopped on SIGTERM by itself (set after the context exits)
    stopped_gracefully: bool | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(env: Mapping[str, str], *, output: IO[bytes] | None = None, log: Path | None = None,
          startup_timeout_s: float = 300.0, stop_timeout_s: float = 60.0,
          build: bool = False) -> Iterator[ServerProcess]:
    """Start the service with `env`, yield once /ready answers 200, stop it on exit."""
    port = free_port()
    args = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port)]
    if not build:
        args.append("--no-build")
    process = subprocess.Popen(args, cwd=REPO_ROOT, env=dict(env), stdout=output,
                               stderr=subprocess.STDOUT if output is not None else None)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process)

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""

    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerStartError(f"server exited with {process.returncode}:\n{tail()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready in {startup_timeout_s:.0f} s:\n{tail()}")
            time.sleep(0.25)
        yield server
    finally:
        server.stopped_gracefully = stop(process, stop_timeout_s)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> bool:
    """SIGTERM, wait; kill if it does not exit in time. True when it exited by itself."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
