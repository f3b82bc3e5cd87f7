"""Publisher against real Redis: channels, streams, ordering, and outages of a private server."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamsrv.config import Settings
from streamsrv.publish import Publisher

GATE = "gate"  # requirepass of a restarted private server until the subscriber is ready


def compact(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def msg(call_id: str, seq: int, kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "call_id": call_id, "seq": seq, "emitted_at": 1.5 + seq, **fields}


async def stream_data(client: aioredis.Redis, key: str) -> list[str]:
    """The `data` field of every entry of a stream (its only field), oldest first."""
    entries: Any = await client.xrange(key)
    assert all(set(fields) == {b"data"} for _, fields in entries)
    return [fields[b"data"].decode() for _, fields in entries]


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Subscriber:
    """Collects pub/sub payloads per channel."""

    def __init__(self, client: aioredis.Redis, channels: list[str]) -> None:
        self.client = client
        self.channels = channels
        self.received: dict[str, list[str]] = {c: [] for c in channels}
        self.pubsub = client.pubsub()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self.pubsub.subscribe(*self.channels)
        self.task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _read(self) -> None:
        async for item in self.pubsub.listen():
            if item["type"] == "message":
                self.received[item["channel"].decode()].append(item["data"].decode())

    async def wait(self, channel: str, count: int) -> list[str]:
        await wait_for(lambda: len(self.received[channel]) >= count)
        return self.received[channel]


class PrivateRedis:
    """A throwaway redis-server on a fixed free port that can be killed and restarted."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None
        self.password: str | None = None

    async def start(self, password: str | None = None) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if password:
            args += ["--requirepass", password]
        self.password = password
        self.process = await asyncio.create_subprocess_exec(
            "redis-server", *args, stdout=asyncio.subprocess.DEVNULL
        )
        client = self.client()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.ping()
                    return
                except (aioredis.RedisError, OSError):
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, password=self.password)

    async def open_gate(self, client: aioredis.Redis) -> None:
        """Let password-less clients (the publisher) in."""
        await client.config_set("requirepass", "")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    try:
        yield server
    finally:
        await server.kill()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_publisher(url: str, prefix: str, **kwargs: Any) -> Publisher:
    settings = Settings(
        redis_url=url,
        redis_channel_prefix=prefix,
        redis_backlog=kwargs.pop("backlog", 10000),
        redis_stream_maxlen=kwargs.pop("stream_maxlen", 1000),
        redis_stream_ttl=kwargs.pop("stream_ttl_seconds", 86400),
    )
    kwargs.setdefault("min_backoff", 0.02)
    kwargs.setdefault("max_backoff", 0.1)
    kwargs.setdefault("ping_interval", 0.1)
    return Publisher(settings, **kwargs)


async def test_messages_arrive_on_both_channels_and_stream(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    call = str(uuid.uuid4())
    messages = [
        (
            msg(call, 1, "call_started", started_at=10.0, peer="10.0.0.1:4000", sample_rate=8000),
            True,
        ),
        (
            msg(call, 2, "partial", segment=0, text="habari", start=0.0, end=1.0, audio_end=1.2),
            False,
        ),
        (
            msg(call, 3, "final", segment=0, text="habari yako", start=0.0, end=1.4, language="sw"),
            False,
        ),
        (msg(call, 4, "dtmf", digit="5", at=2.0), False),
        (
            msg(call, 5, "call_ended", ended_at=13.0, duration=3.0, reason="hangup", segments=1),
            True,
        ),
    ]
    publisher = make_publisher(redis_url, prefix)
    channel, calls = f"{prefix}call:{call}", f"{prefix}calls"
    async with Subscriber(client, [channel, calls]) as sub:
        await publisher.start()
        assert publisher.status == "ok"
        for message, lifecycle in messages:
            publisher.publish(call, message, lifecycle=lifecycle)
        got = await sub.wait(channel, 5)
        got_calls = await sub.wait(calls, 2)
        await publisher.close(timeout=5)
    assert got == [compact(m) for m, _ in messages]
    assert got_calls == [compact(m) for m, lifecycle in messages if lifecycle]
    assert (publisher.published, publisher.dropped) == (5, 0)

    stream = f"{prefix}stream:{call}"
    streamed = [compact(m) for m, _ in messages if m["type"] != "partial"]
    assert await stream_data(client, stream) == streamed
    assert 0 < await client.ttl(stream) <= 86400
    await client.delete(stream)


async def test_stream_is_bounded_and_ttl_configurable(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    call = str(uuid.uuid4())
    publisher = make_publisher(redis_url, prefix, stream_maxlen=10, stream_ttl_seconds=60)
    await publisher.start()
    for seq in range(1, 2001):
        publisher.publish(call, msg(call, seq, "final", segment=seq, text="x"))
    await publisher.close(timeout=10)
    assert publisher.published == 2000
    stream = f"{prefix}stream:{call}"
    assert await client.xlen(stream) < 500  # MAXLEN ~ trims whole nodes, not exactly to 10
    assert 0 < await client.ttl(stream) <= 60
    await client.delete(stream)


async def test_outage_replays_finals_once_in_order_without_stale_partials(
    private_redis: PrivateRedis, prefix: str
) -> None:
    await private_redis.start()
    publisher = make_publisher(private_redis.url, prefix)
    await publisher.start()
    assert publisher.status == "ok"
    a, b = "call-a", "call-b"

    await private_redis.kill()
    await wait_for(lambda: publisher.status == "down")
    sent = [
        (a, msg(a, 1, "partial", segment=0, text="he")),
        (b, msg(b, 1, "partial", segment=0, text="jam")),
        (a, msg(a, 2, "partial", segment=0, text="hello")),
        (a, msg(a, 3, "final", segment=0, text="hello there")),
        (b, msg(b, 2, "partial", segment=0, text="jambo")),
        (a, msg(a, 4, "partial", segment=1, text="how")),
        (a, msg(a, 5, "dtmf", digit="1", at=3.0)),
        (a, msg(a, 6, "final", segment=1, text="how are you")),
        (a, msg(a, 7, "partial", segment=2, text="fine")),
    ]
    for call, message in sent:
        publisher.publish(call, message)
        await asyncio.sleep(0.01)  # the sender keeps retrying meanwhile
    assert publisher.status == "down"

    await private_redis.start(password=GATE)
    client = private_redis.client()
    try:
        channels = [f"{prefix}call:{a}", f"{prefix}call:{b}"]
        async with Subscriber(client, channels) as sub:
            await asyncio.sleep(0.2)  # the publisher is refused while the gate is closed
            assert publisher.status == "down"
            await private_redis.open_gate(client)
            got_a = await sub.wait(channels[0], 4)
            got_b = await sub.wait(channels[1], 1)
            await asyncio.sleep(0.3)  # anything duplicated would arrive now
        expected_a = [compact(m) for c, m in sent if c == a and m["seq"] in (3, 5, 6, 7)]
        assert got_a == expected_a
        assert got_b == [compact(sent[4][1])]
        assert publisher.status == "ok"
        assert publisher.superseded == 4
        assert await stream_data(client, f"{prefix}stream:{a}") == expected_a[:3]
    finally:
        await publisher.close(timeout=2)
        await client.aclose()


async def test_full_backlog_sheds_partials_first_then_oldest(
    private_redis: PrivateRedis, prefix: str
) -> None:
    publisher = make_publisher(private_redis.url, prefix, backlog=4)
    await publisher.start()  # nothing listens yet: must not fail
    assert publisher.status == "down"
    a, b, c = "a", "b", "c"
    publisher.publish(a, msg(a, 1, "partial", segment=0, text="p"))
    finals = [msg(a, seq, "final", segment=seq, text=f"f{seq}") for seq in range(2, 7)]
    publisher.publish(a, finals[0])  # supersedes a's partial
    publisher.publish(b, msg(b, 1, "partial", segment=0, text="p"))
    for final in finals[1:]:  # the 4th sheds b's partial, the 5th the oldest final
        publisher.publish(a, final)
    publisher.publish(c, msg(c, 1, "partial", segment=0, text="p"))  # no room for a partial
    assert (publisher.queued, publisher.dropped, publisher.superseded) == (4, 3, 1)

    await private_redis.start(password=GATE)
    client = private_redis.client()
    try:
        async with Subscriber(client, [f"{prefix}call:{a}"]) as sub:
            await private_redis.open_gate(client)
            got = await sub.wait(f"{prefix}call:{a}", 4)
            await asyncio.sleep(0.2)
        assert got == [compact(m) for m in finals[1:]]
    finally:
        await publisher.close(timeout=2)
        await client.aclose()
    assert publisher.published == 4


async def test_close_while_down_gives_up_after_timeout(
    private_redis: PrivateRedis, prefix: str
) -> None:
    publisher = make_publisher(private_redis.url, prefix)
    await publisher.start()
    for seq in range(1, 4):
        publisher.publish("x", msg("x", seq, "final", segment=seq, text="t"))
    started = time.monotonic()
    await publisher.close(timeout=0.2)
    assert time.monotonic() - started < 2
    assert (publisher.published, publisher.dropped, publisher.queued) == (0, 3, 0)


async def test_publish_never_raises(redis_url: str, prefix: str) -> None:
    publisher = make_publisher(redis_url, prefix)
    await publisher.start()
    publisher.publish("x", {"type": "final", "bad": object()})
    await publisher.close(timeout=2)
    assert (publisher.published, publisher.dropped) == (0, 1)


def test_backlog_invariants_under_random_traffic() -> None:
    """While down: bounded, FIFO per call, no partial followed by a newer message of its call."""
    from streamsrv.publish import _Backlog, _Entry

    rng = random.Random(3)
    backlog = _Backlog(capacity=50)
    order: dict[str, int] = {}
    for n in range(5000):
        call = rng.choice("abcdefgh")
        kind = rng.choice(["partial"] * 6 + ["final", "dtmf"])
        backlog.push(_Entry(call, kind, f"{n}", False), coalesce=True)
        if rng.random() < 0.05:
            for entry in backlog.take(rng.randrange(1, 20)):
                assert int(entry.payload) > order.get(entry.call_id, -1)
                order[entry.call_id] = int(entry.payload)
        assert len(backlog) <= 50
    rest = backlog.take(100)
    assert len(backlog) == 0 and len(rest) <= 50
    for i, entry in enumerate(rest):
        later = [e for e in rest[i + 1 :] if e.call_id == entry.call_id]
        assert entry.kind != "partial" or not later
    assert len(backlog._entries) == len(backlog._partials) == 0
