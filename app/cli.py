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
from app.main import begin_draining, create_app

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


class _Server(uvicorn.Server):
    """uvicorn server that flips readiness off as soon as a shutdown signal arrives.

    uvicorn runs the lifespan shutdown only after connections drain; marking the service as
    draining at the signal lets /ready fail (so load balancers move on) and refuses new
    transcriptions during that window, while in-flight ones complete.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: object) -> None:
        begin_draining(self._app)
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


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

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        # One process owns the GPU and its batching scheduler; scale with replicas, not workers.
        workers=1,
    )
    server = _Server(config, app)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    serve()
