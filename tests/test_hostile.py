"""Bad and hostile input against a running server: garbage, idle and flooding connections,
admission limits, fuzzed streams. Each test causes the condition for real, over TCP, and checks
what matters: the bad connection is closed (with a log line, not a flood of them), every other
call is unaffected, memory stays bounded and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import select
import socket
import threading
import time
import uuid
import wave
from typing import Any

import asyncpg
import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from streamsrv import admission as admission_module
from streamsrv import audiosocket as aso
from streamsrv import call as call_module
from streamsrv import connection as connection_module
from streamsrv import corpus
from streamsrv import server as server_module
from streamsrv.simulate import play_call
from tests.e2e import Collector, call_and_job, get, make_settings, recording_path, running_server
from tests.prom import metric
from tests.serverproc import server_process, subprocess_settings

pytestmark = pytest.mark.e2e

FRAME = 320  # 20 ms of 8 kHz 16-bit audio


def audio_frames(pcm: bytes, kind: int = aso.Kind.AUDIO_8K) -> bytes:
    return b"".join(
        aso.encode(aso.Audio(kind, pcm[i : i + FRAME])) for i in range(0, len(pcm), FRAME)
    )


def call_id_message(call_id: str) -> bytes:
    return aso.encode(aso.CallId(call_id))


async def metrics(port: int) -> str:
    status, text = await get(port, "/metrics")
    assert status == 200
    return text


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closed the connection (EOF or reset); fails after `within`."""
    started = time.monotonic()

    async def until_closed() -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass

    await asyncio.wait_for(until_closed(), within)
    return time.monotonic() - started


def recorded(settings: Any, call_id: str) -> bytes:
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        return w.readframes(w.getnframes())


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-process server's and calls' log events (fresh loggers, so that an earlier
    structlog.configure(cache_logger_on_first_use=True) cannot hide them)."""
    monkeypatch.setattr(server_module, "log", structlog.get_logger("streamsrv.server"))
    monkeypatch.setattr(connection_module, "log", structlog.get_logger("streamsrv.connection"))
    monkeypatch.setattr(admission_module, "log", structlog.get_logger("streamsrv.admission"))
    monkeypatch.setattr(call_module, "log", structlog.get_logger("streamsrv.call"))
    with capture_logs() as captured:
        yield captured


# -- 1. garbage ------------------------------------------------------------------------------


async def test_garbage_connections_are_closed_and_a_live_call_is_unaffected(settings_env, logs):
    settings = make_settings(settings_env, TCP_SOCKET_TIMEOUT="1", CALL_ID_TIMEOUT="1")
    good = corpus.build_call(corpus.pick_prompts(3, 61), pause=0.8)
    good_id = str(uuid.uuid4())
    speech = good.pcm[: 8000 * 2]  # one second of audio for the bad calls that have an id
    rng = np.random.default_rng(7)
    junk = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    junk = b"\x7e" + junk[1:]  # an unknown kind at once, whatever the draw

    bad: dict[str, tuple[str | None, bytes, bool]] = {
        # name: (call id, bytes sent, then EOF?)
        "random": (None, junk, False),
        "unknown_kind_first": (None, b"\x02\x00\x01x", False),
        "unknown_kind_in_call": (str(uuid.uuid4()), b"\x42\x00\x01x", False),
        "bad_dtmf": (str(uuid.uuid4()), b"\x03\x00\x01x", False),
        "huge_length_then_eof": (str(uuid.uuid4()), b"\x10\xff\xff" + b"\x00" * 1000, True),
        "half_message_then_silence": (str(uuid.uuid4()), b"\x10\x01\x40" + b"\x00" * 100, False),
        "silent": (None, b"", False),
    }
    protocol_errors = {"random", "unknown_kind_first", "unknown_kind_in_call", "bad_dtmf"}
    protocol_errors |= {"huge_length_then_eof", "duplicate_call_id"}

    async def bad_connection(name: str) -> tuple[str, float, str]:
        call_id, tail, eof = bad[name]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        peer = "{}:{}".format(*writer.get_extra_info("sockname"))
        if call_id is not None:
            writer.write(call_id_message(call_id) + audio_frames(speech))
        writer.write(tail)
        with contextlib.suppress(ConnectionError):  # the server may already have hung up
            await writer.drain()
            if eof:
                writer.write_eof()
        try:
            return name, await closed_by_server(reader, 6), peer
        finally:
            writer.close()

    async def slowloris() -> tuple[str, float, str]:
        """Sends its call id one byte at a time, never finishing: the socket is never idle for
        TCP_SOCKET_TIMEOUT, so CALL_ID_TIMEOUT must end it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        peer = "{}:{}".format(*writer.get_extra_info("sockname"))
        message = call_id_message(str(uuid.uuid4()))
        closing = asyncio.ensure_future(closed_by_server(reader, 6))
        try:
            for byte in message[:-1]:
                if closing.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)
            return "slowloris", await closing, peer
        finally:
            writer.close()

    async def duplicate() -> tuple[str, float, str]:
        """The live good call's own id, from a second connection."""
        await asyncio.sleep(2.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        peer = "{}:{}".format(*writer.get_extra_info("sockname"))
        writer.write(call_id_message(good_id) + audio_frames(speech))
        try:
            return "duplicate_call_id", await closed_by_server(reader, 6), peer
        finally:
            writer.close()

    async with running_server(settings) as server, Collector(settings) as collected:
        playing = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, good.pcm, call_id=good_id, speed=2)
        )
        await asyncio.sleep(0.5)
        closes = await asyncio.gather(
            *(bad_connection(name) for name in bad), slowloris(), duplicate()
        )
        await playing
        ids = [good_id] + [c for c, _, _ in bad.values() if c is not None]
        await collected.wait_ended(ids)
        await asyncio.wait_for(server.wait_idle(), 10)
        text = await metrics(server.http_port)

    seconds = {name: s for name, s, _ in closes}
    print("closed after (s):", {k: round(v, 2) for k, v in seconds.items()})
    # garbage is refused at once; silence and unfinished handshakes at their timeouts
    for name in protocol_errors - {"duplicate_call_id"}:
        assert seconds[name] < 1.0, name
    assert seconds["duplicate_call_id"] < 1.0
    for name in ("half_message_then_silence", "silent", "slowloris"):
        assert 1.0 <= seconds[name] < 3.0, name

    # the good call: all its finals, all its audio
    messages = collected.by_call[good_id]
    assert messages[0]["type"] == "call_started" and messages[-1]["type"] == "call_ended"
    assert messages[-1]["reason"] == "hangup"
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == len(good.utterances), [f["text"] for f in finals]
    assert recorded(settings, good_id) == good.pcm
    assert sum(1 for m in messages if m["type"] == "call_started") == 1

    # the bad calls that had an id: ended for the right reason, their audio kept
    for name, (call_id, _, _) in bad.items():
        if call_id is None:
            continue
        ended = collected.by_call[call_id][-1]
        expected = "timeout" if name == "half_message_then_silence" else "protocol_error"
        assert ended["reason"] == expected, name
        assert recorded(settings, call_id) == speech, name

    assert metric(text, "streamsrv_protocol_errors_total") == len(protocol_errors)
    assert metric(text, "streamsrv_calls_ended_total", reason="timeout") == 1
    assert metric(text, "streamsrv_calls_ended_total", reason="protocol_error") == 3
    assert metric(text, "streamsrv_calls_ended_total", reason="hangup") == 1
    assert metric(text, "streamsrv_calls_total") == 5

    # each bad connection is logged once, with its cause; a call's own lines aside
    lifecycle = {"call_started", "call_ended", "language_detected"}
    causes = {
        "half_message_then_silence": "socket_timeout",
        "silent": "socket_timeout",
        "slowloris": "no_call_id",
    }
    for name, _, peer in closes:
        call_id = bad.get(name, (None,))[0]
        lines = [
            e["event"]
            for e in logs
            if (e.get("peer") == peer or (call_id and e.get("call_id") == call_id))
            and e["event"] not in lifecycle
        ]
        cause = causes.get(name, "protocol_error")
        assert lines[0] == cause, (name, lines)
        # one line; a connection without a call adds connection_closed (see the xfail below)
        assert lines[1:] in ([[]] if call_id else [[], ["connection_closed"]]), (name, lines)
    good_peer = messages[0]["peer"]
    good_lines = [
        e["event"]
        for e in logs
        if e.get("peer") == good_peer
        or (e.get("call_id") == good_id and e.get("peer") in (None, good_peer))
    ]
    assert set(good_lines) <= lifecycle, good_lines


async def test_a_bad_connection_without_a_call_is_logged_once(settings_env, logs):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only")
    async with running_server(settings) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        peer = "{}:{}".format(*writer.get_extra_info("sockname"))
        writer.write(b"\x7e\x00\x00")
        await closed_by_server(reader, 5)
        writer.close()
        await asyncio.wait_for(server.wait_idle(), 5)
    assert [e["event"] for e in logs if e.get("peer") == peer] == ["protocol_error"]


# -- 2. ten thousand idle connections -----------------------------------------------------------

IDLE_CONNECTIONS = 10_000


async def open_idle(port: int, count: int, batch: int = 500) -> list[socket.socket]:
    """`count` TCP connections that send nothing, opened `batch` at a time."""
    loop = asyncio.get_running_loop()
    sockets: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sockets.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", port))

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return sockets


def closed_by_peer(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the other side has closed (readable: EOF or reset)."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return len(poller.poll(0))


async def until(check: Any, within: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)


async def test_ten_thousand_idle_connections(settings_env):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE_CONNECTIONS + 1000:
        pytest.skip(f"the hard open-files limit ({hard}) is below {IDLE_CONNECTIONS + 1000}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings, env = subprocess_settings(
        settings_env,
        DEFAULT_PROCESSING_MODE="postcall_only",
        CALL_ID_TIMEOUT="60",
        TCP_SOCKET_TIMEOUT="120",
        MAX_PENDING_CONNECTIONS="20000",
        MAX_PENDING_PER_PEER="20000",
        MAX_CALLS="20000",
    )
    call = corpus.build_call(corpus.pick_prompts(2, 65), pause=0.5)
    ids = [str(uuid.uuid4()) for _ in range(2)]
    sockets: list[socket.socket] = []
    try:
        async with server_process(env) as server, Collector(settings) as collected:
            await asyncio.sleep(1.0)  # settle: the first sweeps, the pools
            fds_before, rss_before = server.open_fds(), server.rss_bytes()
            opening = time.monotonic()
            sockets = await open_idle(server.audiosocket_port, IDLE_CONNECTIONS)
            await until(lambda: server.open_fds() >= fds_before + IDLE_CONNECTIONS, 30)
            opened_in = time.monotonic() - opening
            await asyncio.sleep(1.5)  # a sweep or two over all of them
            rss_with = server.rss_bytes()
            growth = rss_with - rss_before
            print(
                f"{IDLE_CONNECTIONS} idle connections opened in {opened_in:.1f} s; server RSS "
                f"{rss_before / 2**20:.1f} -> {rss_with / 2**20:.1f} MiB "
                f"(+{growth / 2**20:.1f} MiB, {growth / IDLE_CONNECTIONS:.0f} B each)"
            )

            # a real call while they wait
            played = await play_call(
                "127.0.0.1", server.audiosocket_port, call.pcm, call_id=ids[0], speed=4
            )
            await collected.wait_ended([ids[0]], within=30)
            assert closed_by_peer(sockets) == 0  # none of the idle ones was dropped
            status, body = await server.get("/health")
            assert status == 200 and json.loads(body)["calls_active"] == 0

            for sock in sockets:
                sock.close()
            sockets = []
            await until(lambda: server.open_fds() <= fds_before + 5, 30)
            status, body = await server.get("/health")
            assert status == 200 and json.loads(body)["calls_active"] == 0
            await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=ids[1], speed=8)
            await collected.wait_ended([ids[1]], within=30)
            text = (await server.get("/metrics"))[1]
            rss_after = server.rss_bytes()
            print(f"server RSS after they closed: {rss_after / 2**20:.1f} MiB")
    finally:
        for sock in sockets:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert played.bytes_sent == len(call.pcm)
    for call_id in ids:
        assert collected.by_call[call_id][-1]["reason"] == "hangup"
        assert recorded(settings, call_id) == call.pcm
    assert metric(text, "streamsrv_calls_total") == 2
    assert metric(text, "streamsrv_connections_refused_total", reason="max_calls") == 0
    # quiet: idle connections and their clean close log nothing
    noisy = [e for e in server.logs if e.get("level") in ("warning", "error", "critical")]
    assert not noisy and not server.other_lines, (noisy[:5], server.other_lines[:5])
    assert len(server.logs) < 50
    # measured: +17.2 MiB for 10,000 (about 1.8 KB a connection: protocol object, decoder,
    # uvloop handle; CPython 3.11, uvloop 0.23), the same on every run; under 3x that
    assert growth < 48 * 2**20


# -- 3. connection flood ----------------------------------------------------------------------

FLOOD = 300


def junk(n: int) -> bytes:
    """Three kinds of junk in turn: random bytes (never a call id), a call id's header and
    nothing after it, and a call id message announcing 65535 bytes."""
    kind = n % 3
    if kind == 0:
        noise = bytearray(np.random.default_rng(n).bytes(64))
        if noise[0] == aso.Kind.UUID:
            noise[0] = 0x02
        return bytes(noise)
    if kind == 1:
        return b"\x01\x00\x10"
    return b"\x01\xff\xff" + bytes(100)


async def test_a_flood_from_the_pbx_address_never_costs_a_real_call(settings_env):
    """300 junk connections at once from 127.0.0.1 while two real calls start from the same
    address: both calls are served whole (row, recording, job, finals); the junk is closed."""
    settings, env = subprocess_settings(settings_env)
    calls = [corpus.build_call(corpus.pick_prompts(2, seed), pause=0.8) for seed in (66, 67)]
    ids = [str(uuid.uuid4()) for _ in calls]
    flooders: list[asyncio.StreamWriter] = []

    async def flooder(n: int) -> None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
            flooders.append(writer)
            writer.write(junk(n))
            await writer.drain()

    async with server_process(env) as server, Collector(settings) as collected:
        fds_before = server.open_fds()
        port = server.audiosocket_port
        tasks = [asyncio.ensure_future(flooder(n)) for n in range(FLOOD // 2)]
        playing = [
            asyncio.ensure_future(
                play_call("127.0.0.1", port, calls[0].pcm, call_id=ids[0], speed=2)
            )
        ]
        tasks += [asyncio.ensure_future(flooder(n)) for n in range(FLOOD // 2, FLOOD * 3 // 4)]
        playing.append(
            asyncio.ensure_future(
                play_call("127.0.0.1", port, calls[1].pcm, call_id=ids[1], speed=2)
            )
        )
        tasks += [asyncio.ensure_future(flooder(n)) for n in range(FLOOD * 3 // 4, FLOOD)]
        await asyncio.gather(*tasks)
        await asyncio.sleep(2.5)  # the grace (1 s), then a sweep (once a second)
        # the junk that still waits for its call id is bounded by the limits
        pending_fds = server.open_fds() - fds_before
        played = await asyncio.gather(*playing)
        await collected.wait_ended(ids, within=60)
        for writer in flooders:
            writer.close()
        await asyncio.sleep(1.2)  # the once-a-second summary of refusals
        text = (await server.get("/metrics"))[1]
    print(f"{pending_fds} descriptors open 2.5 s into the flood")
    assert pending_fds <= settings.max_pending_per_peer + len(calls) + 5
    assert metric(text, "streamsrv_connections_refused_total", reason="pending_limit") > 0
    assert metric(text, "streamsrv_calls_total") == len(calls)
    assert metric(text, "streamsrv_protocol_errors_total") >= FLOOD * 2 // 3 - 1
    # logged: the first refusal at once, then a summary a second, not a line per connection
    assert len(server.events("connection_refused")) <= 3
    assert not server.other_lines
    for call, call_id, sent in zip(calls, ids, played, strict=True):
        assert sent.bytes_sent == len(call.pcm)
        messages = collected.by_call[call_id]
        assert messages[-1]["type"] == "call_ended" and messages[-1]["reason"] == "hangup"
        finals = [m for m in messages if m["type"] == "final"]
        assert [m["segment"] for m in finals] == list(range(len(call.utterances)))
        assert all(m["text"].strip() for m in finals)
        assert recorded(settings, call_id) == call.pcm
        row = await call_and_job(settings.database_url, call_id)
        assert row is not None and (row["status"], row["job"]) == ("ended", "queued")
        assert row["audio_path"] == str(recording_path(settings, call_id))


# -- 4. limits -------------------------------------------------------------------------------


async def send_paced(
    port: int, call_id: str, pcm: bytes, speed: float = 1.0
) -> tuple[int, float | None]:
    """Like Asterisk, but stops as soon as the server closes the connection: (bytes of audio
    written, seconds from connecting until the server closed it, None if it never did)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    closing = asyncio.ensure_future(closed_by_server(reader, 3600))
    writer.write(call_id_message(call_id))
    sent = 0
    for n, offset in enumerate(range(0, len(pcm), FRAME)):
        if closing.done():
            break
        chunk = pcm[offset : offset + FRAME]
        writer.write(aso.encode(aso.Audio(aso.Kind.AUDIO_8K, chunk)))
        sent += len(chunk)
        await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 / speed - time.monotonic()))
    closed: float | None = None
    if closing.done():
        closed = closing.result()  # it started with the connection
    else:
        closing.cancel()
    writer.close()
    return sent, closed


async def test_max_calls_refuses_the_next_connection_and_recovers(settings_env):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only", MAX_CALLS="2")
    call = corpus.build_call(corpus.pick_prompts(1, 62), pause=0.5)
    first, second, refused_id, later = (str(uuid.uuid4()) for _ in range(4))
    async with running_server(settings) as server, Collector(settings) as collected:
        port = server.audiosocket_port
        playing = [
            asyncio.create_task(play_call("127.0.0.1", port, call.pcm, call_id=c, speed=2))
            for c in (first, second)
        ]
        await asyncio.sleep(0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(call_id_message(refused_id) + audio_frames(call.pcm[:16000]))
        assert await closed_by_server(reader, 5) < 0.5
        writer.close()
        await asyncio.gather(*playing)
        await asyncio.wait_for(server.wait_idle(), 10)
        # capacity comes back with the calls' end
        await play_call("127.0.0.1", port, call.pcm, call_id=later, speed=4)
        await collected.wait_ended([first, second, later])
        text = await metrics(server.http_port)
    assert metric(text, "streamsrv_connections_refused_total", reason="max_calls") == 1
    assert metric(text, "streamsrv_calls_total") == 3
    for call_id in (first, second, later):
        assert collected.by_call[call_id][-1]["reason"] == "hangup"
        assert recorded(settings, call_id) == call.pcm
    assert refused_id not in collected.by_call
    assert not list(settings.recordings_dir.rglob(f"{refused_id}.wav"))


@pytest.mark.parametrize(("allowed", "served"), [("10.0.0.0/8", False), ("127.0.0.0/8", True)])
async def test_allowed_peers(settings_env, allowed, served):
    settings = make_settings(
        settings_env, DEFAULT_PROCESSING_MODE="postcall_only", ALLOWED_PEERS=allowed
    )
    call = corpus.build_call(corpus.pick_prompts(1, 63), pause=0.5)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        sent, closed = await send_paced(server.audiosocket_port, call_id, call.pcm, speed=8)
        if served:
            await collected.wait_ended([call_id])
        else:
            await asyncio.sleep(0.5)  # time for anything that would have been published
        text = await metrics(server.http_port)
    refused = metric(text, "streamsrv_connections_refused_total", reason="peer_not_allowed")
    if served:
        assert closed is None and sent == len(call.pcm)
        assert collected.by_call[call_id][-1]["reason"] == "hangup"
        assert recorded(settings, call_id) == call.pcm
        assert refused == 0
    else:
        assert closed is not None and closed < 0.5
        assert call_id not in collected.by_call
        assert not list(settings.recordings_dir.rglob(f"{call_id}.wav"))
        assert refused == 1
        assert metric(text, "streamsrv_calls_total") == 0


async def test_max_call_seconds_ends_records_and_queues_the_call(settings_env, database_url):
    settings = make_settings(
        settings_env, DEFAULT_PROCESSING_MODE="postcall_only", MAX_CALL_SECONDS="2"
    )
    call = corpus.build_call(corpus.pick_prompts(3, 64), pause=0.5)
    assert call.seconds > 6
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        sent, closed = await send_paced(server.audiosocket_port, call_id, call.pcm[: 6 * 16000])
        await collected.wait_ended([call_id])
        await asyncio.wait_for(server.wait_idle(), 10)
        text = await metrics(server.http_port)
    assert closed is not None and 2.0 <= closed <= 3.5, closed
    ended = collected.by_call[call_id][-1]
    assert ended["reason"] == "max_duration"
    audio = recorded(settings, call_id)
    # exactly the audio the server received until then: a prefix of what was sent
    assert 1.9 * 16000 <= len(audio) <= sent
    assert audio == call.pcm[: len(audio)]
    assert metric(text, "streamsrv_bytes_received_total") == len(audio)
    assert ended["audio_seconds"] == pytest.approx(len(audio) / 16000, abs=0.001)
    assert metric(text, "streamsrv_calls_ended_total", reason="max_duration") == 1
    row = await call_and_job(database_url, call_id)
    assert row is not None
    assert (row["status"], row["job"], row["id"]) == ("ended", "queued", ended["job_id"])
    assert row["audio_path"] == str(recording_path(settings, call_id))


# -- 5. fuzz ----------------------------------------------------------------------------------

AUDIO_KINDS = sorted(aso.AUDIO_RATES)
END_MESSAGES = [
    b"",  # EOF on a message boundary: Asterisk's own hang-up
    aso.encode(aso.Hangup()),
    aso.encode(aso.Error(None)),
    aso.encode(aso.Error(3)),
]
messages_st = st.one_of(
    st.builds(
        lambda kind, payload: aso.encode(aso.Audio(kind, payload)),
        st.sampled_from([aso.Kind.AUDIO_8K] * 4 + AUDIO_KINDS),
        st.binary(max_size=700),
    ),
    st.builds(lambda digit: aso.encode(aso.Dtmf(digit)), st.sampled_from("0123456789*#ABCD")),
)
mutation_st = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=12)),
)
stream_st = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=3000)),
    st.tuples(
        st.just("valid"),
        st.lists(messages_st, max_size=30),
        st.sampled_from(END_MESSAGES),
        st.lists(mutation_st, max_size=3),
    ),
)


def mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for mutation in mutations:
        at = mutation[1] % (len(out) + 1)
        if mutation[0] == "flip" and at < len(out):
            out[at] ^= 1 << mutation[2]
        elif mutation[0] == "truncate":
            del out[at:]
        elif mutation[0] == "insert":
            out[at:at] = mutation[2]
    return bytes(out)


def expected_end(data: bytes) -> tuple[str | None, str, list[aso.Event]]:
    """What the server must make of `data` then EOF, by the codec's own reading: the call id
    (None: no call), how the connection ends, and the events before that."""
    decoder = aso.Decoder()
    decoder.receive_data(data)
    decoder.receive_data(b"")
    call_id = None
    events: list[aso.Event] = []
    try:
        for event in decoder.events():
            if isinstance(event, aso.CallId):
                call_id = event.call_id
            elif isinstance(event, aso.Error):
                return call_id, "asterisk_error", events
            elif isinstance(event, (aso.Hangup, aso.ConnectionClosed)):
                return call_id, "hangup", events
            events.append(event)
    except aso.ProtocolError:
        return call_id, "protocol_error", events
    raise AssertionError("the decoder neither ended nor failed at EOF")


def exchange(port: int, data: bytes) -> None:
    """Send `data`, close our side, and wait for the server to close its side."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first: garbage is refused as soon as it is seen
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the server kept {data[:40]!r}... open for 5 s") from None


async def test_fuzzed_streams_never_hurt_the_server(settings_env, logs):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only")
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    sent: list[tuple[str | None, str, list[aso.Event]]] = []

    async with running_server(settings) as server, Collector(settings) as collected:
        port = server.audiosocket_port

        @hyp_settings(
            max_examples=80,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(stream_st)
        def fuzz(stream: tuple[Any, ...]) -> None:
            if stream[0] == "random":
                data = stream[1]
            else:
                _, messages, end, mutations = stream
                data = call_id_message(str(uuid.uuid4())) + b"".join(messages) + end
                data = mutate(data, mutations)
            outcome = expected_end(data)
            assume(outcome[0] is None or outcome[0] not in {c for c, _, _ in sent})
            exchange(port, data)  # raises when the server does not close it within 5 s
            sent.append(outcome)

        await asyncio.to_thread(fuzz)
        ids = [c for c, _, _ in sent if c is not None]
        await collected.wait_ended(ids, within=30)
        await asyncio.wait_for(server.wait_idle(), 10)
        assert not server.connections and not server.calls
        text = await metrics(server.http_port)

        # still whole: healthy, and a real call goes through
        status, body = await get(server.http_port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        call = corpus.build_call(corpus.pick_prompts(1, 67), pause=0.5)
        good_id = str(uuid.uuid4())
        await play_call("127.0.0.1", port, call.pcm, call_id=good_id, speed=8)
        await collected.wait_ended([good_id])
    assert collected.by_call[good_id][-1]["reason"] == "hangup"
    assert recorded(settings, good_id) == call.pcm

    reasons = [r for _, r, _ in sent]
    print(
        f"{len(sent)} fuzz connections, {len(ids)} with a call id;",
        {r: reasons.count(r) for r in sorted(set(reasons))},
    )
    assert len(sent) >= 50
    assert not unhandled, unhandled[:3]
    errors = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert not errors, errors[:3]
    assert metric(text, "streamsrv_protocol_errors_total") == reasons.count("protocol_error")
    for reason in ("hangup", "protocol_error", "asterisk_error"):
        expected = sum(1 for c, r, _ in sent if c is not None and r == reason)
        assert metric(text, "streamsrv_calls_ended_total", reason=reason) == expected, reason
    for call_id, reason, events in sent:
        if call_id is None:
            continue
        messages = collected.by_call[call_id]
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "call_started" and kinds[-1] == "call_ended", kinds
        assert kinds.count("call_started") == kinds.count("call_ended") == 1
        assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
        assert messages[-1]["reason"] == reason, (call_id, messages[-1])
        digits = [e.digit for e in events if isinstance(e, aso.Dtmf)]
        assert [m["digit"] for m in messages if m["type"] == "dtmf"] == digits
        # the recording: at the rate of the call's first frame (8 kHz when a key came first)
        audio = [e for e in events if isinstance(e, aso.Audio)]
        first = next((e for e in events if isinstance(e, (aso.Audio, aso.Dtmf))), None)
        rate = first.sample_rate if isinstance(first, aso.Audio) else 8000
        with wave.open(str(recording_path(settings, call_id))) as w:
            assert w.getframerate() == rate
        if all(a.kind == aso.Kind.AUDIO_8K for a in audio):
            pcm = b"".join(a.payload for a in audio)  # an odd last byte waits for its pair
            assert recorded(settings, call_id) == pcm[: len(pcm) // 2 * 2]


# -- bugs found on the way ---------------------------------------------------------------------


async def test_a_reused_call_id_leaves_the_first_calls_recording_alone(settings_env, database_url):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only")
    first = corpus.build_call(corpus.pick_prompts(1, 68), pause=0.5)
    second = corpus.build_call(corpus.pick_prompts(1, 69), pause=0.5)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        port = server.audiosocket_port
        await play_call("127.0.0.1", port, first.pcm, call_id=call_id, speed=8)
        await collected.wait_ended([call_id])
        job_id = collected.by_call[call_id][-1]["job_id"]
        await asyncio.wait_for(server.wait_idle(), 10)
        # the same id again, from a peer that replays or guesses it
        await send_paced(port, call_id, second.pcm, speed=8)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.wait_idle(), 10)
    conn = await asyncpg.connect(database_url)
    try:
        job = await conn.fetchrow("select id, audio_path from postcall_jobs where id = $1", job_id)
    finally:
        await conn.close()
    assert job is not None
    with wave.open(job["audio_path"]) as w:
        assert w.readframes(w.getnframes()) == first.pcm, "the queued job's audio was replaced"


@pytest.mark.parametrize(
    "hang_up",
    ["during", "after"],
)
async def test_hanging_up_during_a_vad_pass_keeps_every_final(settings_env, monkeypatch, hang_up):
    settings = make_settings(settings_env)
    call = corpus.build_call(corpus.pick_prompts(1, 70), pause=0.5)
    assert len(call.pcm) < 60_000  # one read for the server: one VAD pass holds all of it
    call_id = str(uuid.uuid4())
    passing = threading.Event()
    async with running_server(settings) as server, Collector(settings) as collected:
        assert server.vad is not None
        run = server.vad.run

        def busy_run(state: Any, audio: Any) -> Any:
            """A VAD pass as slow as under load (many calls per pass)."""
            if len(audio) > 16000:
                passing.set()
                time.sleep(0.5)
            return run(state, audio)

        monkeypatch.setattr(server.vad, "run", busy_run)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        writer.write(call_id_message(call_id) + audio_frames(call.pcm))
        await writer.drain()
        assert await asyncio.to_thread(passing.wait, 5)
        if hang_up == "after":
            await asyncio.sleep(1.0)  # the control: the pass is over
        writer.write_eof()  # hang up while that pass runs, or after it
        await closed_by_server(reader, 10)
        writer.close()
        await collected.wait_ended([call_id])
    assert recorded(settings, call_id) == call.pcm  # the audio itself all arrived
    finals = [m["text"] for m in collected.by_call[call_id] if m["type"] == "final"]
    assert len(finals) == len(call.utterances), finals


async def test_audio_far_faster_than_real_time_is_bounded_and_loses_nothing(settings_env):
    settings, env = subprocess_settings(settings_env, TCP_SOCKET_TIMEOUT="120")
    call = corpus.build_call(corpus.pick_prompts(4, 71), pause=0.8)
    burst = call.pcm * 4  # 91 s of speech, 1.5 MB on the wire
    warm_id, burst_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with server_process(env) as server, Collector(settings) as collected:
        port = server.audiosocket_port
        # Warm up with the same burst: the model's working memory for full batches (up to
        # MAX_BATCH_SIZE windows of each length, beam search) is allocated on first use, about
        # 200 MiB measured; what must stay bounded is what grows with the audio sent.
        _reader, warm = await asyncio.open_connection("127.0.0.1", port)
        warm.write(call_id_message(warm_id) + audio_frames(burst))
        await warm.drain()
        warm.write_eof()
        await collected.wait_ended([warm_id])
        warm.close()
        base = peak = server.rss_bytes()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(call_id_message(burst_id) + audio_frames(burst))
        await writer.drain()
        quiet_since, count = time.monotonic(), 0
        while time.monotonic() - quiet_since < 3.0:  # until the transcript stops growing
            await asyncio.sleep(0.02)
            peak = max(peak, server.rss_bytes())
            if len(collected.by_call[burst_id]) != count:
                quiet_since, count = time.monotonic(), len(collected.by_call[burst_id])
        writer.close()
        await collected.wait_ended([burst_id])
        after = server.rss_bytes()
    print(f"rss base {base / 2**20:.0f} peak {peak / 2**20:.0f} after {after / 2**20:.0f} MiB")
    finals = [m for m in collected.by_call[burst_id] if m["type"] == "final" and m["text"]]
    expected = 4 * len(call.utterances)
    growth = (peak - base) / 2**20
    print(
        f"burst of {len(burst) / 16000:.0f} s: +{growth:.0f} MiB, {len(finals)}/{expected} finals"
    )
    assert recorded(settings, burst_id) == burst
    # Measured with one model worker: peak +67..+165 MiB over the warmed-up base, back to
    # +1..+3 MiB after; with a worker per core (the default) peak +226 and +63 after, the
    # second worker's model buffers. Without flow control a 10 min burst reached +470 MiB and
    # lost finals: what grows with the audio is bounded, what remains is the model's own.
    assert growth < 400 and (after - base) / 2**20 < 120, (growth, after, base)
    assert len(finals) == expected, (len(finals), expected)
