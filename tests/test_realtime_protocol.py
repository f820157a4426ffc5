"""/v1/realtime: the OpenAI Realtime transcription protocol, against scripted runtimes.

Real uvicorn on loopback in the test's event loop, no engine: each test takes well under a
second of wall time.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from realtime_helpers import FINAL_SUFFIX, ScriptedRuntime, connect, quiet, serve, speech

from app import metrics
from app.errors import QueueFullError

pytestmark = pytest.mark.usefixtures("clean_env")

MANUAL = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}


def chunks(samples: np.ndarray, rate: int = 24000, ms: int = 100) -> list[np.ndarray]:
    step = rate * ms // 1000
    return [samples[i : i + step] for i in range(0, len(samples), step)]


async def test_session_created_then_updated_in_the_current_shape() -> None:
    async with serve(ScriptedRuntime()) as address, connect(address) as client:
        created = await client.recv()
        assert created["type"] == "session.created"
        assert created["event_id"].startswith("event_")
        session = created["session"]
        assert session["type"] == "transcription"
        audio_input = session["audio"]["input"]
        assert audio_input["format"] == {"type": "audio/pcm", "rate": 24000}
        assert audio_input["turn_detection"]["type"] == "server_vad"  # OpenAI's default

        await client.send(
            type="session.update",
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 16000},
                        "transcription": {"model": "whisper-1", "language": "en", "prompt": "Hi"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 700},
                        "noise_reduction": {"type": "near_field"},  # accepted, ignored
                    }
                },
                "include": ["item.input_audio_transcription.logprobs"],
            },
        )
        updated = await client.recv()
        assert updated["type"] == "session.updated"
        audio_input = updated["session"]["audio"]["input"]
        assert audio_input["format"]["rate"] == 16000
        assert audio_input["transcription"] == {
            "model": "whisper-1",
            "language": "en",
            "prompt": "Hi",
        }
        assert audio_input["turn_detection"]["silence_duration_ms"] == 700
        assert audio_input["turn_detection"]["prefix_padding_ms"] == 300

        await client.send(type="session.update", session=MANUAL)
        updated = await client.recv()
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        assert updated["session"]["audio"]["input"]["format"]["rate"] == 16000  # merged


async def test_older_transcription_session_names_and_flat_shape() -> None:
    async with serve(ScriptedRuntime()) as address:
        headers = {"OpenAI-Beta": "realtime=v1"}
        async with connect(address, additional_headers=headers) as client:
            created = await client.recv()
            assert created["type"] == "transcription_session.created"
            assert created["session"]["input_audio_format"] == "pcm16"
        async with connect(address) as client:
            await client.expect("session.created")
            await client.send(
                type="transcription_session.update",
                session={
                    "input_audio_format": "pcm16",
                    "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                    "turn_detection": None,
                },
            )
            updated = await client.recv()
            assert updated["type"] == "transcription_session.updated"
            assert updated["session"]["turn_detection"] is None
            assert updated["session"]["input_audio_transcription"]["language"] == "en"


async def test_manual_commits_give_items_in_order_with_finals() -> None:
    runtime = ScriptedRuntime()
    async with serve(runtime) as address, connect(address) as client:
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        items = []
        for seconds in (1.0, 1.5):
            await client.append(speech(seconds))
            await client.send(type="input_audio_buffer.commit", event_id="evt_commit")
            committed = await client.expect("input_audio_buffer.committed")
            created = await client.expect("conversation.item.created")
            completed = await client.expect("conversation.item.input_audio_transcription.completed")
            assert created["item"]["id"] == committed["item_id"] == completed["item_id"]
            assert created["item"]["role"] == "user"
            assert created["item"]["content"] == [{"type": "input_audio", "transcript": None}]
            assert completed["content_index"] == 0
            assert completed["transcript"] == runtime.text_for(seconds)
            assert completed["usage"] == {
                "type": "duration",
                "seconds": pytest.approx(seconds, abs=0.01),
            }
            items.append(committed)
        assert items[0]["previous_item_id"] is None
        assert items[1]["previous_item_id"] == items[0]["item_id"]
        # The final used the REST defaults (beam search), partials greedy.
        assert [greedy for _, greedy in runtime.calls if not greedy]


async def test_finals_complete_in_turn_order_even_when_decoded_out_of_order() -> None:
    runtime = ScriptedRuntime(final_delays=[0.4, 0.0])  # the first turn decodes slower
    async with (
        serve(runtime, realtime_partial_interval_s=0) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        committed = []
        for seconds in (1.0, 0.6):
            await client.append(speech(seconds))
            await client.send(type="input_audio_buffer.commit")
            committed.append((await client.expect("input_audio_buffer.committed"))["item_id"])
        finals = await client.expect_count(
            "conversation.item.input_audio_transcription.completed", 2
        )
        assert [f["item_id"] for f in finals] == committed


async def test_16khz_input_is_accepted() -> None:
    runtime = ScriptedRuntime()
    async with serve(runtime) as address, connect(address) as client:
        await client.expect("session.created")
        await client.send(
            type="session.update",
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 16000},
                        "turn_detection": None,
                    }
                },
            },
        )
        await client.expect("session.updated")
        await client.append(speech(1.2, rate=16000))
        await client.send(type="input_audio_buffer.commit")
        completed = await client.expect("conversation.item.input_audio_transcription.completed")
        assert completed["usage"]["seconds"] == pytest.approx(1.2, abs=0.01)


async def test_partials_are_stable_prefixes_and_concatenate_to_the_final() -> None:
    runtime = ScriptedRuntime(word_s=0.3)
    async with (
        serve(runtime, realtime_partial_interval_s=0.2) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        for piece in chunks(speech(3.0)):
            await client.append(piece)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        await client.send(type="input_audio_buffer.commit")
        completed = await client.expect("conversation.item.input_audio_transcription.completed")
        deltas = client.of_type("conversation.item.input_audio_transcription.delta")
        assert len(deltas) >= 3, deltas
        assert {d["item_id"] for d in deltas} == {completed["item_id"]}
        assert all(d["content_index"] == 0 for d in deltas)
        text = "".join(d["delta"] for d in deltas)
        assert text == completed["transcript"] == runtime.text_for(3.0)
        assert runtime.max_in_flight == 1  # partials never pile up


async def test_a_final_that_differs_from_the_partials_is_sent_whole() -> None:
    runtime = ScriptedRuntime(word_s=0.3, final_suffix=FINAL_SUFFIX)
    async with (
        serve(runtime, realtime_partial_interval_s=0.2) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        for piece in chunks(speech(2.0)):
            await client.append(piece)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        await client.send(type="input_audio_buffer.commit")
        completed = await client.expect("conversation.item.input_audio_transcription.completed")
        sent = "".join(
            d["delta"] for d in client.of_type("conversation.item.input_audio_transcription.delta")
        )
        assert completed["transcript"].endswith(FINAL_SUFFIX)
        assert completed["transcript"].startswith(sent)  # deltas are a prefix of the final


async def test_server_vad_turns() -> None:
    runtime = ScriptedRuntime()
    audio = np.concatenate([quiet(0.6), speech(1.2), quiet(1.0), speech(0.9), quiet(1.0)])
    async with serve(runtime, realtime_partial_interval_s=0) as address, connect(address) as client:
        await client.expect("session.created")
        for piece in chunks(audio):
            await client.append(piece)
        started = await client.expect("input_audio_buffer.speech_started")
        stopped = await client.expect("input_audio_buffer.speech_stopped")
        committed = await client.expect("input_audio_buffer.committed")
        assert started["item_id"] == stopped["item_id"] == committed["item_id"]
        # Speech starts at 600 ms; the turn includes 300 ms of prefix padding.
        assert started["audio_start_ms"] == pytest.approx(300, abs=80)
        assert stopped["audio_end_ms"] == pytest.approx(1800 + 500, abs=120)
        second = await client.expect("input_audio_buffer.speech_started")
        assert second["audio_start_ms"] == pytest.approx(2800 - 300, abs=80)
        second_commit = await client.expect("input_audio_buffer.committed")
        assert second_commit["previous_item_id"] == committed["item_id"]
        finals = await client.expect_count(
            "conversation.item.input_audio_transcription.completed", 2
        )
        by_item = {f["item_id"]: f for f in finals}
        assert set(by_item) == {committed["item_id"], second_commit["item_id"]}
        # prefix + speech + the silence that ended it: 0.3 + 1.2 + 0.5 s
        assert by_item[committed["item_id"]]["usage"]["seconds"] == pytest.approx(2.0, abs=0.12)


async def test_silence_queues_no_decodes_and_clear_empties_the_buffer() -> None:
    runtime = ScriptedRuntime()
    async with (
        serve(runtime, realtime_partial_interval_s=0.2) as address,
        connect(address) as client,
    ):
        await client.expect("session.created")
        for piece in chunks(quiet(2.0)):
            await client.append(piece)
        await client.send(type="input_audio_buffer.clear")
        await client.expect("input_audio_buffer.cleared")
        assert runtime.calls == []  # server VAD heard no speech: nothing was decoded


async def test_disconnect_cancels_in_flight_decodes() -> None:
    runtime = ScriptedRuntime(block=True)
    sessions_before = metrics.WEBSOCKET_SESSIONS._value.get()
    async with serve(runtime, realtime_partial_interval_s=0.2) as address:
        async with connect(address) as client:
            await client.expect("session.created")
            await client.send(type="session.update", session=MANUAL)
            await client.expect("session.updated")
            await client.append(speech(1.0))
            await client.send(type="input_audio_buffer.commit")
            await client.expect("conversation.item.created")
            for _ in range(100):
                if runtime.in_flight:
                    break
                await asyncio.sleep(0.01)
            assert runtime.in_flight >= 1
            assert metrics.WEBSOCKET_SESSIONS._value.get() == sessions_before + 1
        for _ in range(200):
            if (
                runtime.in_flight == 0
                and metrics.WEBSOCKET_SESSIONS._value.get() == sessions_before
            ):
                break
            await asyncio.sleep(0.01)
        assert runtime.in_flight == 0 and runtime.cancelled >= 1
        assert metrics.WEBSOCKET_SESSIONS._value.get() == sessions_before


async def test_final_failure_is_a_failed_event_and_the_session_goes_on() -> None:
    runtime = ScriptedRuntime(error=QueueFullError("The server is at capacity.", retry_after_s=1))
    async with serve(runtime, realtime_partial_interval_s=0) as address, connect(address) as client:
        await client.expect("session.created")
        await client.send(type="session.update", session=MANUAL)
        await client.expect("session.updated")
        await client.append(speech(0.5))
        await client.send(type="input_audio_buffer.commit")
        failed = await client.expect("conversation.item.input_audio_transcription.failed")
        assert failed["error"]["code"] == "queue_full"
        await client.append(speech(0.5))  # still open
        await client.send(type="input_audio_buffer.commit")
        await client.expect("input_audio_buffer.committed")


async def test_audio_seconds_metric() -> None:
    before = metrics.WEBSOCKET_AUDIO_SECONDS._value.get()
    async with serve(ScriptedRuntime()) as address, connect(address) as client:
        await client.expect("session.created")
        await client.append(quiet(1.5))
        await client.send(type="input_audio_buffer.clear")
        await client.expect("input_audio_buffer.cleared")
    assert metrics.WEBSOCKET_AUDIO_SECONDS._value.get() - before == pytest.approx(1.5)
