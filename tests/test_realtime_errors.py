"""/v1/realtime: bad input gets an OpenAI `error` event (the session goes on); limits close it.

Small limits are set per test through Settings; the server is real uvicorn on loopback with a
scripted runtime.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import websockets
from realtime_helpers import Client, ScriptedRuntime, connect, serve, speech

from app.streaming.events import ErrorDetail, ErrorEvent
from app.streaming.outbox import Outbox, SlowClientError

pytestmark = pytest.mark.usefixtures("clean_env")

MANUAL = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}


def assert_error(event: dict, code: str, param: str | None = None) -> dict:
    """OpenAI's error event shape, with the given code and param."""
    assert event["type"] == "error", event
    assert event["event_id"].startswith("event_")
    error = event["error"]
    assert set(error) == {"type", "code", "message", "param", "event_id"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    return error


async def still_works(client: Client) -> None:
    """The session answers a valid event after the error."""
    await client.send(type="input_audio_buffer.clear")
    await client.expect("input_audio_buffer.cleared")


@pytest.fixture
async def session():
    """A connected client in manual-commit mode on a default server."""
    async with (
        serve(ScriptedRuntime(), realtime_partial_interval_s=0) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        yield client


async def test_invalid_json(session: Client) -> None:
    await session.ws.send("{not json")
    assert_error(await session.recv(), "invalid_json")
    await session.ws.send("[1, 2]")
    assert_error(await session.recv(), "invalid_json")
    await still_works(session)


async def test_unknown_event_type_echoes_the_event_id(session: Client) -> None:
    await session.send(type="response.create", event_id="evt_42")
    error = assert_error(await session.recv(), "invalid_value", "type")
    assert error["event_id"] == "evt_42"
    assert "input_audio_buffer.append" in error["message"]
    await session.send(event_id="evt_43")
    assert_error(await session.recv(), "missing_required_parameter", "type")
    await still_works(session)


async def test_missing_audio_field(session: Client) -> None:
    await session.send(type="input_audio_buffer.append")
    assert_error(await session.recv(), "missing_required_parameter", "audio")
    await still_works(session)


async def test_bad_base64(session: Client) -> None:
    await session.send(type="input_audio_buffer.append", audio="not base64!!")
    assert_error(await session.recv(), "invalid_value", "audio")
    await still_works(session)


async def test_odd_length_pcm(session: Client) -> None:
    await session.send(
        type="input_audio_buffer.append", audio=base64.b64encode(b"\x00\x01\x02").decode()
    )
    assert_error(await session.recv(), "invalid_audio", "audio")
    await still_works(session)


async def test_binary_frames_are_read_as_json(session: Client) -> None:
    await session.ws.send(json.dumps({"type": "input_audio_buffer.clear"}).encode())
    await session.expect("input_audio_buffer.cleared")


@pytest.mark.parametrize(
    ("update", "param"),
    [
        (
            {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
            "session.audio.input.format.type",
        ),
        (
            {
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}},
            },
            "session.audio.input.format.rate",
        ),
        ({"input_audio_format": "g711_ulaw"}, "session.input_audio_format"),
        (
            {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}},
            },
            "session.audio.input.turn_detection.type",
        ),
        (
            {"turn_detection": {"type": "server_vad", "threshold": 3}},
            "session.turn_detection.threshold",
        ),
        ({"type": "realtime"}, "session.type"),
        (
            {"type": "transcription", "audio": {"input": {"transcription": {"language": "fr"}}}},
            "session.audio.input.transcription.language",
        ),
    ],
)
async def test_unsupported_session_update_keeps_the_session(
    session: Client, update: dict, param: str
) -> None:
    await session.send(type="session.update", session=update)
    assert_error(await session.recv(), "invalid_value", param)
    # Nothing changed: still 24 kHz PCM16, manual commits.
    await session.send(type="session.update", session={"type": "transcription"})
    updated = await session.expect("session.updated")
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert updated["session"]["audio"]["input"]["turn_detection"] is None


async def test_unknown_model(session: Client) -> None:
    update = {"type": "transcription", "audio": {"input": {"transcription": {"model": "large-v9"}}}}
    await session.send(type="session.update", session=update)
    assert_error(await session.recv(), "model_not_found", "session.audio.input.transcription.model")


async def test_commit_of_an_empty_buffer(session: Client) -> None:
    await session.send(type="input_audio_buffer.commit")
    assert_error(await session.recv(), "input_audio_buffer_commit_empty")
    await still_works(session)


async def test_frame_too_large() -> None:
    async with (
        serve(ScriptedRuntime(), realtime_max_frame_bytes=4096) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.append(speech(0.1))  # 4.8 kB of PCM16, 6.4 kB as base64
        assert_error(await client.recv(), "message_too_large")
        await still_works(client)


async def test_buffer_overflow_in_manual_mode() -> None:
    runtime = ScriptedRuntime()
    async with (
        serve(runtime, realtime_max_buffer_s=1.0, realtime_partial_interval_s=0) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        await client.append(speech(0.8))
        await client.append(speech(0.5))
        assert_error(await client.recv(), "input_audio_buffer_full", "audio")
        await client.send(type="input_audio_buffer.commit")
        completed = await client.expect("conversation.item.input_audio_transcription.completed")
        assert completed["usage"]["seconds"] == pytest.approx(
            0.8, abs=0.01
        )  # rejected audio dropped


async def test_long_turn_under_server_vad_is_committed_at_the_buffer_limit() -> None:
    async with (
        serve(
            ScriptedRuntime(), realtime_max_buffer_s=1.0, realtime_partial_interval_s=0
        ) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        for _ in range(25):  # 2.5 s of uninterrupted "speech"
            await client.append(speech(0.1))
        committed = await client.expect_count("input_audio_buffer.committed", 2)
        assert committed[1]["previous_item_id"] == committed[0]["item_id"]
        assert not client.of_type("error")


async def test_idle_timeout_sends_an_error_then_closes() -> None:
    async with (
        serve(ScriptedRuntime(), realtime_idle_timeout_s=0.3) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        assert_error(await client.recv(timeout=3), "idle_timeout")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.recv(timeout=3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "idle timeout"


async def test_waiting_for_a_final_is_not_idling() -> None:
    runtime = ScriptedRuntime(final_delays=[0.8])
    async with (
        serve(runtime, realtime_idle_timeout_s=0.3, realtime_partial_interval_s=0) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        await client.append(speech(0.5))
        await client.send(type="input_audio_buffer.commit")
        await client.expect("conversation.item.input_audio_transcription.completed", timeout=3)
        assert not client.of_type("error")
        assert_error(await client.recv(timeout=3), "idle_timeout")  # idle after it


async def test_session_length_is_limited_even_while_busy() -> None:
    async with (
        serve(
            ScriptedRuntime(), realtime_max_session_s=0.6, realtime_partial_interval_s=0
        ) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        with pytest.raises(websockets.ConnectionClosed):
            for _ in range(100):  # keeps sending, so it is never idle
                await client.append(speech(0.05))
                await asyncio.sleep(0.02)
        # What arrived before the close is still readable.
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await client.recv()
        assert_error(client.of_type("error")[0], "session_expired")
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_unauthorised_connections_are_refused() -> None:
    async with serve(ScriptedRuntime(), api_key="s3cret") as address:
        for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(address, **kwargs):
                    pass
            assert refused.value.response.status_code == 401
            body = json.loads(refused.value.response.body)
            assert body["error"]["code"] == "invalid_api_key"

        async with connect(
            address, additional_headers={"Authorization": "Bearer s3cret"}
        ) as client:
            assert (await client.recv())["type"] == "session.created"
        async with connect(
            address, path="/v1/realtime?intent=transcription&api_key=s3cret"
        ) as client:
            assert (await client.recv())["type"] == "session.created"
        # Browsers: the key travels as a subprotocol, which must never be echoed back.
        protocols = ["realtime", "openai-insecure-api-key.s3cret"]
        async with connect(address, subprotocols=protocols) as client:  # type: ignore[arg-type]
            assert client.ws.subprotocol == "realtime"
            assert (await client.recv())["type"] == "session.created"


async def test_other_intents_are_refused() -> None:
    async with serve(ScriptedRuntime()) as address:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(address, path="/v1/realtime?intent=conversation"):
                pass
        assert refused.value.response.status_code == 400


async def test_a_client_that_stops_reading_is_dropped() -> None:
    """Outbox unit test: a send that never completes fills the bounded queue."""
    stuck = asyncio.Event()

    async def never_sends(text: str) -> None:
        await stuck.wait()

    outbox = Outbox(never_sends, max_pending=4, send_timeout_s=60)
    sender = asyncio.create_task(outbox.run())
    event = ErrorEvent(error=ErrorDetail(type="invalid_request_error", code="x", message="m"))
    for _ in range(10):
        outbox.put(event)
        await asyncio.sleep(0)
    failure = await asyncio.wait_for(outbox.failed, 1)
    assert isinstance(failure, SlowClientError)
    await outbox.finish(sender, timeout_s=0.1)
    assert sender.done()


async def test_a_send_that_stalls_past_the_timeout_drops_the_client() -> None:
    async def slow(text: str) -> None:
        await asyncio.sleep(10)

    outbox = Outbox(slow, max_pending=100, send_timeout_s=0.05)
    sender = asyncio.create_task(outbox.run())
    outbox.put(ErrorEvent(error=ErrorDetail(type="t", code=None, message="m")))
    assert isinstance(await asyncio.wait_for(outbox.failed, 1), SlowClientError)
    await outbox.finish(sender, timeout_s=0.1)
