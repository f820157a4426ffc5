"""`whisper-serve`: build the default engine on first run, then serve with uvicorn.

Settings come from WHISPER_* environment variables; --host/--port/--models override them.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.engine.config import CONFIG_FILE
from app.main import begin_draining, create_app, stop_now
from app.server import log_redaction, memory
from app.server.protocols import ClosingWebSocketProtocol, ConnectionLimits, http_protocol
from app.server.server import DrainingServer

log = logging.getLogger("whisper_serve")

#: The engine `python build_engines.py` builds with no arguments, from the bundled weights.
BUNDLED_ENGINE = "tiny.en"
#: uvicorn's own exit status for "application startup failed".
STARTUP_FAILURE = 3


def ensure_bundled_engine(settings: Settings) -> None:
    """Build engines/tiny.en from the bundled weights if it is configured and absent.

    Other engines need a checkpoint the operator chooses, so they are never built here; the
    lifespan refuses to start without them and prints the build command.
    """
    if BUNDLED_ENGINE not in settings.models:
        return
    engine_dir = settings.engine_dir(BUNDLED_ENGINE)
    if (engine_dir / CONFIG_FILE).is_file():
        return
    command = [sys.executable, "-m", "build_engines", "--output", str(engine_dir)]
    log.info("No engine at %s; building it (one-off): %s", engine_dir, " ".join(command))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        log.error("Building %s failed (exit %d)", engine_dir, result.returncode)
        sys.exit(result.returncode or 1)


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """uvicorn with the service's connection limits, log redaction and shutdown stages."""
    limits = ConnectionLimits(
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        body_min_rate=settings.http_body_min_rate,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        # One process owns the GPU and its batching scheduler; scale with replicas, not workers.
        workers=1,
        http=http_protocol(limits),
        ws=ClosingWebSocketProtocol,
        timeout_keep_alive=max(1, round(settings.http_keep_alive_timeout_s)),
    )
    log_redaction.install()
    return DrainingServer(
        config,
        drain_s=settings.shutdown_drain_s,
        grace_s=settings.shutdown_grace_s,
        on_drain=lambda: begin_draining(app),
        on_hard_stop=lambda: stop_now(app),
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="whisper-serve", description="Serve Whisper over an OpenAI-compatible API."
    )
    parser.add_argument("--host", help="bind address (WHISPER_HOST)")
    parser.add_argument("--port", type=int, help="port (WHISPER_PORT)")
    parser.add_argument("--models", help="comma-separated engine names (WHISPER_MODELS)")
    parser.add_argument(
        "--no-build", action="store_true", help="do not build engines/tiny.en when it is missing"
    )
    return parser.parse_args(argv)


def serve(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.models is not None:
        overrides["models"] = args.models
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.no_build:
        ensure_bundled_engine(settings)

    memory.limit_arenas()
    app = create_app(settings)
    server = build_server(app, settings)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    serve()
