"""The server around the calls: HTTP /health and /metrics, processing modes, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
import wave

import asyncpg
import pytest

from streamsrv import audiosocket as aso
from streamsrv import corpus
from streamsrv.simulate import play_call
from tests.e2e import (
    Collector,
    call_and_job,
    get,
    make_settings,
    recording_path,
    running_server,
)
from tests.serverproc import server_process, subprocess_settings

pytestmark = pytest.mark.e2e


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_health_and_metrics(settings_env):
    settings = make_settings(settings_env)
    call = corpus.build_call(corpus.pick_prompts(2, 41), pause=0.8)
    async with running_server(settings) as server, Collector(settings) as collected:
        status, body = await get(server.http_port, "/health")
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ok"
        assert (health["model"], health["redis"], health["postgres"]) == ("ok", "ok", "ok")
        assert health["calls_active"] == 0

        call_id = str(uuid.uuid4())
        played = await play_call(
            "127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=4
        )
        await collected.wait_ended([call_id])
        await asyncio.wait_for(server.wait_idle(), 10)  # call_ended goes out just before
        status, text = await get(server.http_port, "/metrics")
    assert status == 200
    assert metric(text, "streamsrv_calls_total") == 1
    assert metric(text, "streamsrv_calls_active") == 0
    assert metric(text, "streamsrv_frames_received_total") == played.frames_sent
    assert metric(text, "streamsrv_bytes_received_total") == played.bytes_sent
    finals = sum(1 for m in collected.by_call[call_id] if m["type"] == "final")
    assert metric(text, "streamsrv_finals_total") == finals > 0
    assert metric(text, "streamsrv_inference_batch_size_count") >= finals
    assert metric(text, "streamsrv_postcall_jobs_total") == 1
    assert "streamsrv_inference_batch_duration_seconds_bucket" in text
    assert "streamsrv_inference_queue_length" in text
    names = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert names and all(n.startswith("streamsrv_") for n in names)


@pytest.mark.parametrize("mode", ["postcall_only", "realtime_only"])
async def test_processing_modes(settings_env, database_url, mode):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE=mode)
    call = corpus.build_call(corpus.pick_prompts(2, 42), pause=0.8)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=4)
        await collected.wait_ended([call_id])
    messages = collected.by_call[call_id]
    kinds = {m["type"] for m in messages}
    assert messages[0]["processing_mode"] == mode
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.readframes(w.getnframes()) == call.pcm
    conn = await asyncpg.connect(database_url)
    try:
        jobs = await conn.fetchval(
            "select count(*) from postcall_jobs where call_id = $1", uuid.UUID(call_id)
        )
    finally:
        await conn.close()
    if mode == "postcall_only":
        assert kinds == {"call_started", "call_ended"}
        assert jobs == 1 and messages[-1]["job_id"] is not None
    else:
        assert "final" in kinds
        assert jobs == 0 and messages[-1]["job_id"] is None


async def test_what_waits_below_a_read_burst_is_read_when_the_audio_stops(settings_env):
    """Reads wait for bursts of frames (half a second for a call that is only recorded). When
    the audio stops without a hangup, a key pressed after the last frames is still published,
    at its place in the audio, and those frames are recorded."""
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only")
    call_id = str(uuid.uuid4())
    frame = aso.encode(aso.Audio(aso.Kind.AUDIO_8K, bytes(320)))
    async with running_server(settings) as server, Collector(settings) as collected:
        _, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        writer.write(aso.encode(aso.CallId(call_id)) + frame * 30)  # bursts are armed
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(frame * 3 + aso.encode(aso.Dtmf("5")))  # less than a burst; then a gap
        await writer.drain()
        key = await collected.wait_message(call_id, "dtmf", within=5)  # timeout is 30 s
        assert key["at"] == pytest.approx(33 * 0.02)
        writer.write(aso.encode(aso.Hangup()))
        writer.close()
        await collected.wait_ended([call_id])
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.getnframes() == 33 * 160


async def test_sigterm_drains_open_calls_then_exits_zero(settings_env, database_url, tmp_path):
    """A real `streamsrv serve` process: SIGTERM while a call is open stops new connections,
    lets the call finish, flushes its finals, recording and job, and exits 0."""
    settings, env = subprocess_settings(settings_env, DRAIN_TIMEOUT="60")
    call = corpus.build_call(corpus.pick_prompts(3, 43), pause=0.8)
    call_id = str(uuid.uuid4())
    async with server_process(env) as server, Collector(settings) as collected:
        asp = server.audiosocket_port
        playing = asyncio.create_task(
            play_call("127.0.0.1", asp, call.pcm, call_id=call_id, speed=2)
        )
        await asyncio.sleep(1.5)
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection("127.0.0.1", asp)
        await playing
        await collected.wait_ended([call_id])
        code = await server.wait(60)
    assert code == 0
    messages = collected.by_call[call_id]
    assert messages[-1]["reason"] == "hangup"
    assert sum(1 for m in messages if m["type"] == "final") == 3
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.readframes(w.getnframes()) == call.pcm
    row = await call_and_job(database_url, call_id)
    assert row is not None and (row["status"], row["job"]) == ("ended", "queued")
    events = [x["event"] for x in server.logs]
    assert "draining" in events and events[-1] == "stopped"
    assert [x["call_id"] for x in server.logs if x["event"] == "call_started"] == [call_id]


async def test_saturated_model_serves_new_calls_as_postcall_only(settings_env, database_url):
    """Past capacity a call is still taken, recorded and queued, without live transcripts,
    and says so in its messages and in /metrics."""
    import numpy as np

    from streamsrv.asr.whisper import AsrRequest

    settings = make_settings(settings_env, MAX_QUEUE_SIZE="2", MAX_BATCH_SIZE="1")
    call = corpus.build_call(corpus.pick_prompts(2, 44), pause=0.8)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        assert server.executor is not None
        speech = np.frombuffer(call.pcm, "<i2").astype(np.float32) / 32768
        busy = [
            server.executor.submit(AsrRequest("load", speech, True, "en"), key="final")
            for _ in range(4)
        ]
        assert server.load() >= 1.0
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=8)
        await collected.wait_ended([call_id])
        await asyncio.gather(*busy)
        _, text = await get(server.http_port, "/metrics")
    messages = collected.by_call[call_id]
    assert [m["type"] for m in messages] == ["call_started", "call_ended"]
    assert messages[0]["processing_mode"] == messages[-1]["processing_mode"] == "postcall_only"
    assert messages[-1]["job_id"] is not None
    assert metric(text, "streamsrv_calls_without_live_asr_total") == 1
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.readframes(w.getnframes()) == call.pcm


async def test_a_start_that_fails_midway_closes_what_it_opened(settings_env):
    """HTTP's port is taken: start() fails after Redis, Postgres, the journal and the
    AudioSocket listener are up. run() still closes them all, and frees the port it took."""
    import socket

    from streamsrv.server import Server
    from tests.e2e import free_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    audiosocket_port = free_port()
    settings = make_settings(
        settings_env,
        DEFAULT_PROCESSING_MODE="postcall_only",
        AUDIOSOCKET_PORT=str(audiosocket_port),
        HTTP_PORT=str(taken.getsockname()[1]),
    )
    server = Server(settings)
    try:
        with pytest.raises(OSError):
            await server.run(handle_signals=False)
    finally:
        taken.close()
    assert not server.accepting
    assert server.publisher.status == "down" and not server.store.jobs.started
    with socket.socket() as again:  # the listener that start() opened is gone
        again.bind(("127.0.0.1", audiosocket_port))
