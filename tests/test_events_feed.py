"""GET /events: the board's feed. A real server (without the model: the messages are published
through its own Publisher into a real Redis), read as a browser's EventSource reads it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import aiohttp
import pytest
import redis.asyncio as aioredis

from streamsrv import events
from streamsrv.follow import Follower, Message
from streamsrv.server import Server
from tests.e2e import free_port, get, make_settings, running_server
from tests.sse import SseReader

NO_MODEL = {"DEFAULT_PROCESSING_MODE": "postcall_only"}


def started(call_id: str, context: dict[str, str] | None = None) -> events.CallStarted:
    return events.CallStarted(
        call_id=call_id,
        started_at=time.time(),
        peer="127.0.0.1:1",
        sample_rate=8000,
        processing_mode="hybrid",
        context=context,
    )


def final(call_id: str, segment: int, text: str) -> events.Final:
    return events.Final(
        call_id=call_id, segment=segment, text=text, start=segment, end=segment + 0.5, language="en"
    )


def partial(call_id: str, segment: int, text: str) -> events.Partial:
    return events.Partial(
        call_id=call_id, segment=segment, text=text, start=segment, end=segment + 0.4,
        audio_end=segment + 0.4,
    )  # fmt: skip


def ended(call_id: str) -> events.CallEnded:
    return events.CallEnded(
        call_id=call_id, ended_at=time.time(), duration=3.0, audio_seconds=3.0, reason="hangup",
        segments=2, job_id=None, processing_mode="hybrid",
    )  # fmt: skip


class Emitter:
    """Publishes a call's events through the server's publisher, numbering them as a call does,
    and waits until Redis has them."""

    def __init__(self, server: Server, call_id: str) -> None:
        self.server = server
        self.call_id = call_id
        self.seq = 0

    async def emit(self, *items: events.Event) -> None:
        """Publish the events (none: only wait for what is queued)."""
        for event in items:
            self.seq += 1
            self.server.publisher.emit(event, self.seq)
        for _ in range(200):  # until the publisher has sent them, and the batch in flight
            await asyncio.sleep(0.01)
            if not self.server.publisher.queued:
                break
        await asyncio.sleep(0.05)


def url(server: Server, query: str = "") -> str:
    return f"http://127.0.0.1:{server.http_port}/events{query}"


def texts(messages: list[dict[str, object]], kind: str = "final") -> list[object]:
    return [m["text"] for m in messages if m["type"] == kind]


async def test_a_late_reader_gets_each_active_call_so_far_then_what_follows(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a, b = Emitter(server, str(uuid.uuid4())), Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id), final(a.call_id, 0, "hello there"))
        await a.emit(partial(a.call_id, 1, "how can"))  # not kept: a late reader does not get it
        await b.emit(started(b.call_id, {"role": "agent"}))
        async with SseReader(url(server)) as reader:
            assert reader.status == 200
            assert reader.content_type.startswith("text/event-stream")
            replayed = await reader.wait_for(3)
            await a.emit(partial(a.call_id, 1, "how can I"), final(a.call_id, 1, "how can I help"))
            await b.emit(final(b.call_id, 0, "good morning"), ended(b.call_id))
            await reader.wait_for(7)
    assert [m["type"] for m in replayed[:3]].count("call_started") == 2
    assert texts(reader.messages(a.call_id)) == ["hello there", "how can I help"]
    assert texts(reader.messages(a.call_id), "partial") == ["how can I"]
    assert reader.messages(b.call_id)[0]["context"] == {"role": "agent"}
    assert [m["type"] for m in reader.messages(b.call_id)][-1] == "call_ended"
    ids = [int(e.id) for e in reader.events if e.id is not None]
    assert len(ids) == len(reader.events)  # every call's message carries an id
    assert ids == sorted(ids)  # never going back: a resume point is the last one seen


async def test_a_reader_that_reconnects_with_last_event_id_misses_nothing(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id), final(a.call_id, 0, "one"))
        async with SseReader(url(server)) as first:
            await first.wait_for(2)
            await a.emit(final(a.call_id, 1, "two"))
            await first.wait_for(3)
        resume = first.events[-1].last_id
        await a.emit(partial(a.call_id, 2, "thr"), final(a.call_id, 2, "three"))
        b = Emitter(server, str(uuid.uuid4()))  # a call that started and ended while away
        await b.emit(started(b.call_id), final(b.call_id, 0, "brief"), ended(b.call_id))
        headers = {"Last-Event-ID": resume}
        async with SseReader(url(server), headers) as second:
            await second.wait_for(4)
            await a.emit(final(a.call_id, 3, "four"))
            await second.wait_for(5)
    seen: dict[tuple[str, int], dict[str, object]] = {}
    for message in first.messages() + second.messages():
        seen.setdefault((str(message["call_id"]), int(message["seq"])), message)  # type: ignore[call-overload]
    kept = [m for m in seen.values() if m["type"] != "partial"]
    assert texts(sorted(kept, key=lambda m: (m["call_id"] != a.call_id, m["seq"]))) == [  # type: ignore[arg-type,operator]
        "one", "two", "three", "four", "brief",
    ]  # fmt: skip


async def test_the_feed_can_follow_chosen_calls_only(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a, b = Emitter(server, str(uuid.uuid4())), Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id))
        await b.emit(started(b.call_id))
        async with SseReader(url(server, f"?call={b.call_id}")) as reader:
            await reader.wait_for(1)
            await a.emit(final(a.call_id, 0, "not this one"))
            await b.emit(final(b.call_id, 0, "this one"))
            await reader.wait_for(2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(url(server, "?call=not-a-call")) as bad,
        ):
            assert bad.status == 400
    assert {m["call_id"] for m in reader.messages()} == {b.call_id}
    assert texts(reader.messages()) == ["this one"]


async def test_calls_of_a_server_that_stopped_beating_are_not_shown_as_running(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    names = events.Channels(settings.redis_channel_prefix)
    ghost = str(uuid.uuid4())
    async with running_server(settings) as server:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:  # what a server that died mid-call leaves behind
            await client.hset(names.active, ghost, "gone-host:1")
            await client.xadd(
                names.stream(ghost), {"data": json.dumps(events.encode(started(ghost), 1))}
            )
        finally:
            await client.aclose()
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id))
        async with SseReader(url(server)) as reader:
            await reader.wait_for(1)
            await a.emit(final(a.call_id, 0, "live"))
            await reader.wait_for(2)
    assert {m["call_id"] for m in reader.messages()} == {a.call_id}


async def test_the_board_and_its_feed_need_credentials_off_loopback(settings_env):
    settings = make_settings(
        settings_env, **NO_MODEL, HTTP_HOST="0.0.0.0", BOARD_PASSWORD="s3cret", HTTP_TOKEN="tok"
    )
    good = "Basic " + base64.b64encode(b"supervisor:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"supervisor:guess").decode()
    async with running_server(settings) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        async with aiohttp.ClientSession() as session:

            async def status(path: str, auth: str | None = None) -> tuple[int, str, str]:
                headers = {"Authorization": auth} if auth else {}
                async with session.get(base + path, headers=headers) as r:
                    body = (await r.read()).decode()[:200] if r.status != 200 else ""
                    return r.status, r.headers.get("WWW-Authenticate", ""), body

            for path in ("/", "/board/board.js", "/events", f"/calls/{uuid.uuid4()}"):
                code, challenge, body = await status(path)
                assert (code, challenge.startswith("Basic")) == (401, True), path
                assert "supervisor" not in body and "s3cret" not in body
                assert (await status(path, wrong))[0] == 401
            assert (await status("/", good))[0] == 200
            assert (await status("/board/board.css", "Bearer tok"))[0] == 200
            assert (await status("/health"))[0] == 200  # probes need no credentials
            async with SseReader(base + "/events", {"Authorization": good}) as reader:
                assert reader.status == 200
    assert "s3cret" not in repr(settings)


async def test_off_loopback_without_credentials_configured_nothing_is_shown(settings_env):
    settings = make_settings(settings_env, **NO_MODEL, HTTP_HOST="0.0.0.0")
    async with running_server(settings) as server:
        status, body = await get(server.http_port, "/events")
    assert status == 401
    assert "BOARD_PASSWORD" in json.loads(body)["error"]


async def test_the_board_is_served_from_the_package(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.http_port}"
        async with session.get(base + "/") as page:
            html = await page.text()
            assert page.content_type == "text/html"
        for asset in ("/board/board.js", "/board/board.css"):
            async with session.get(base + asset) as r:
                assert r.status == 200, asset
        async with session.get(base + "/board/..%2Fhttp.py") as r:
            assert r.status == 404
    assert 'src="/board/board.js"' in html and "http" not in html.split("<body>")[1].split("//")[0]


async def test_with_redis_away_the_feed_answers_503_and_the_server_keeps_serving(settings_env):
    settings = make_settings(
        settings_env, **NO_MODEL, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"
    )
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        async with session.get(url(server)) as r:
            assert r.status == 503
        async with session.get(f"http://127.0.0.1:{server.http_port}/health") as r:
            assert r.status == 200


def test_a_follower_that_falls_behind_is_ended_not_given_a_gap() -> None:
    follower = Follower(None, limit=2)
    for seq in range(1, 6):
        follower.offer(Message("{}", {"call_id": "c", "seq": seq}))
    assert follower.ended == "behind"
    kept = [follower.queue.get_nowait() for _ in range(follower.queue.qsize())]
    assert kept[-1] is None  # the reader learns it must reconnect and replay
    assert [m.seq for m in kept[:-1] if m is not None] == [1, 2]


@pytest.mark.parametrize("calls", [None, frozenset({"b"})])
def test_a_follower_gets_only_the_calls_it_asked_for(calls: frozenset[str] | None) -> None:
    follower = Follower(calls)
    for call in ("a", "b"):
        follower.offer(Message("{}", {"call_id": call, "seq": 1}))
    got = [follower.queue.get_nowait().call_id for _ in range(follower.queue.qsize())]  # type: ignore[union-attr]
    assert got == (["a", "b"] if calls is None else ["b"])


async def test_a_board_on_one_server_shows_the_calls_of_another_sharing_the_redis(settings_env):
    first = make_settings(settings_env, **NO_MODEL)
    second = make_settings(
        {**settings_env, "SPOOL_DIR": settings_env["SPOOL_DIR"] + "-2"},
        **NO_MODEL,
        REDIS_CHANNEL_PREFIX=first.redis_channel_prefix,
    )
    async with running_server(first) as here, running_server(second) as there:
        elsewhere = Emitter(there, str(uuid.uuid4()))
        await elsewhere.emit(started(elsewhere.call_id), final(elsewhere.call_id, 0, "over there"))
        async with SseReader(url(here)) as reader:
            await reader.wait_for(2)
            await elsewhere.emit(final(elsewhere.call_id, 1, "and on"))
            await reader.wait_for(3)
    assert texts(reader.messages(elsewhere.call_id)) == ["over there", "and on"]
