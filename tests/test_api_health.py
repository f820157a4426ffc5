"""Lifespan, liveness/readiness probes and /metrics."""

from __future__ import annotations

import httpx
import pytest
from conftest import FakeRuntime

from app.api.registry import Phase
from app.config import Settings
from app.errors import EngineError
from app.main import begin_draining, create_app


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_lifespan_starts_and_stops_runtimes(clean_env) -> None:
    runtime = FakeRuntime()
    app = create_app(Settings(), {"tiny.en": runtime})
    async with client_for(app) as client:
        # Before the lifespan ran: alive, not ready.
        assert (await client.get("/health")).status_code == 200
        before = await client.get("/ready")
        assert before.status_code == 503 and before.json() == {"status": "starting"}
        async with app.router.lifespan_context(app):
            assert runtime.started and not runtime.stopped
            ready = await client.get("/ready")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "models": ["tiny.en", "whisper-1"]}
            begin_draining(app)
            assert (await client.get("/ready")).status_code == 503
            assert (await client.get("/health")).status_code == 200
        assert runtime.stopped
        assert app.state.registry.phase is Phase.STOPPED


async def test_failed_start_stops_the_runtimes_already_started(clean_env) -> None:
    class Broken(FakeRuntime):
        async def start(self) -> None:
            raise EngineError("engine broken. Build it with: python build_engines.py")

    good, broken = FakeRuntime("tiny.en"), Broken("base", multilingual=True)
    app = create_app(Settings(models=["tiny.en", "base"]), {"tiny.en": good, "base": broken})
    with pytest.raises(EngineError):
        async with app.router.lifespan_context(app):
            pass
    assert good.started and good.stopped


async def test_missing_engine_refuses_to_start_with_build_hint(clean_env, tmp_path, caplog) -> None:
    app = create_app(Settings(engines_dir=tmp_path, models=["tiny.en"]))
    with pytest.raises(EngineError, match="build_engines.py"):
        async with app.router.lifespan_context(app):
            pass
    assert "Cannot start" in caplog.text and "build_engines.py" in caplog.text


async def test_metrics_endpoint(make_client) -> None:
    client = await make_client()
    await client.get("/health")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE whisper_requests_total counter" in response.text
    assert 'whisper_requests_total{endpoint="/health",status="200"}' in response.text
    assert "whisper_batch_size" in response.text


def test_gpu_memory_reads_nothing_without_a_gpu(monkeypatch) -> None:
    from app import gpu_memory

    readings = gpu_memory.read_gpu_memory()
    for gpu, used, total in readings:  # a GPU host reports real numbers
        assert gpu.isdigit() and 0 <= used <= total
    gpu_memory.refresh_gpu_memory()


def test_importing_app_main_loads_nothing_heavy(repo_root) -> None:
    import subprocess
    import sys

    code = "import sys, app.main; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
