"""FastAPI app factory. The lifespan loads and warms every configured engine before serving.

`app.main:app` is built on first access (module __getattr__), so importing this module reads
no settings and loads nothing; engines are loaded only when the server runs the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api import demo, health, metrics, models, openapi, realtime, transcriptions
from app.api.errors import install_exception_handlers
from app.api.middleware import CloseUnreadBodyMiddleware, RequestMetricsMiddleware
from app.api.registry import ModelRegistry, Phase
from app.audio.budget import AudioBudget
from app.config import Settings
from app.engine.config import load_engine_config
from app.errors import EngineError
from app.server.lifecycle import Lifecycle

if TYPE_CHECKING:
    from app.runtime import Runtime

log = logging.getLogger(__name__)

__version__ = "0.1.0"


def _load_runtimes(settings: Settings) -> dict[str, Runtime]:
    # Imported here: the runtime pulls in torch, which must not load at import time.
    from app.runtime import RuntimeOptions, load_runtime

    # Check every engine directory first (cheap), so a typo in the last model fails in
    # milliseconds instead of after loading and warming all the others.
    for name in settings.models:
        load_engine_config(settings.engine_dir(name))
    options = RuntimeOptions.from_settings(settings)
    runtimes: dict[str, Runtime] = {}
    for name in settings.models:
        engine_dir = settings.engine_dir(name)
        log.info("Loading engine %s from %s", name, engine_dir)
        runtimes[name] = load_runtime(engine_dir, options, name)
    return runtimes


async def _start_all(app: FastAPI, runtimes: dict[str, Runtime]) -> list[Runtime]:
    registry: ModelRegistry = app.state.registry
    started: list[Runtime] = []
    try:
        for name, runtime in runtimes.items():
            await runtime.start()
            started.append(runtime)
            registry.add(name, runtime)
    except BaseException:
        await _stop_all(started)
        raise
    return started


async def _stop_all(runtimes: list[Runtime]) -> None:
    results = await asyncio.gather(
        *(runtime.stop() for runtime in runtimes), return_exceptions=True
    )
    for runtime, result in zip(runtimes, results, strict=True):
        if isinstance(result, BaseException):
            log.error("Stopping %s failed: %r", runtime.name, result)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    registry: ModelRegistry = app.state.registry
    injected: dict[str, Runtime] | None = app.state.injected_runtimes
    try:
        if injected is None:
            from app.engine.cpu.threads import confine_to_one_thread

            confine_to_one_thread()  # the event loop's torch ops stay single-threaded
        # Loading reads hundreds of MB of weights; a thread keeps the loop (and signals) alive.
        runtimes = (
            injected if injected is not None else await asyncio.to_thread(_load_runtimes, settings)
        )
        started = await _start_all(app, runtimes)
    except EngineError as exc:
        # The message names the engine and the build command; make it the last thing logged.
        log.error("Cannot start: %s", exc)
        raise
    except Exception:
        log.exception("Cannot start: loading the engines failed")
        raise
    registry.phase = Phase.READY
    log.info("Ready: serving %s (default %s)", ", ".join(registry.ids()), registry.default_model)
    try:
        yield
    finally:
        # The server has drained its connections by now; stop() finishes any accepted work.
        registry.phase = Phase.DRAINING
        await _stop_all(started)
        registry.phase = Phase.STOPPED
        log.info("Stopped")


def create_app(
    settings: Settings | None = None, runtimes: dict[str, Runtime] | None = None
) -> FastAPI:
    """Build the service. `runtimes` replaces engine loading (tests inject fakes here)."""
    settings = settings or Settings()
    default_model = settings.default_model_name
    if runtimes is not None and default_model not in runtimes:
        default_model = next(iter(runtimes))

    app = openapi.DocumentedApp(
        title="whisper-serve",
        version=__version__,
        summary="OpenAI-compatible Whisper speech-to-text",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry(default_model)
    app.state.injected_runtimes = runtimes
    app.state.lifecycle = Lifecycle()
    app.state.audio_budget = AudioBudget(
        settings.audio_memory_budget_bytes, wait_s=settings.audio_budget_wait_s
    )

    install_exception_handlers(app)
    app.add_middleware(CloseUnreadBodyMiddleware)
    app.add_middleware(RequestMetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    for module in (transcriptions, realtime, models, health, metrics, demo):
        app.include_router(module.router)
    demo.mount_static(app)
    return app


def begin_draining(app: FastAPI) -> None:
    """Flip /ready to 503 and refuse new work while in-flight requests finish."""
    registry: ModelRegistry = app.state.registry
    if registry.phase is Phase.READY:
        registry.phase = Phase.DRAINING
    app.state.lifecycle.begin_draining()


def stop_now(app: FastAPI) -> None:
    """The grace period is over: cancel what still runs (its clients get 503)."""
    begin_draining(app)
    app.state.lifecycle.stop_now()


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` and `from app.main import app` both land here on first use.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
