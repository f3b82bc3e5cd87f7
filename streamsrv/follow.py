"""Following calls as they happen, for the board (GET /events) and `streamsrv tail`.

Three sources make one feed without gaps or repeats:
- which calls run now, on every server sharing the Redis: the `active` hash that publishers keep,
  less the calls of servers whose heartbeat has expired (a server that died mid-call);
- what a call said so far: its stream (every message but partials);
- what it says next: pub/sub, one subscription per process shared by all its followers.

A follower subscribes first and replays second, then drops live messages the replay already
gave (a call's `seq` only grows), so a message published during the replay is neither lost nor
shown twice. A follower that falls too far behind, or that was subscribed while Redis dropped
the subscription, is ended rather than silently given a gap: its client reconnects with the
time of the last message it saw and replays from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamsrv import events

log = structlog.get_logger(__name__)

CLOCK_SKEW = 5.0  # seconds replayed before a resume point: servers' clocks and batching differ
FOLLOWER_BACKLOG = 5000  # messages a follower may lag before it is ended


@dataclass(frozen=True, slots=True)
class Message:
    """One published message: its JSON text as sent and the object it encodes."""

    raw: str
    data: dict[str, Any]

    @property
    def call_id(self) -> str:
        return str(self.data.get("call_id", ""))

    @property
    def seq(self) -> int | None:
        seq = self.data.get("seq")
        return seq if isinstance(seq, int) else None

    @property
    def emitted_at(self) -> float:
        at = self.data.get("emitted_at")
        return float(at) if isinstance(at, int | float) else 0.0

    @classmethod
    def parse(cls, raw: str | bytes) -> Message | None:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return cls(text, data) if isinstance(data, dict) else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CallIndex:
    """Reads which calls run or ended lately, and what they said (their streams)."""

    def __init__(self, client: aioredis.Redis, channels: events.Channels) -> None:
        self._client = client
        self._channels = channels

    async def active(self) -> list[str]:
        """Calls running now on a live server (oldest heartbeat first is not promised)."""
        found = await self._client.hgetall(self._channels.active)
        holders = {_text(c): _text(s) for c, s in found.items()}
        if not holders:
            return []
        servers = sorted(set(holders.values()))
        pipe = self._client.pipeline(transaction=False)
        for server in servers:
            pipe.exists(self._channels.server(server))
        alive = {s for s, up in zip(servers, await pipe.execute(), strict=True) if up}
        return [c for c, s in holders.items() if s in alive]

    async def ended(self, limit: int, since: float | None = None) -> list[str]:
        """The last `limit` calls to end (newest first), or those that ended after `since`."""
        if limit <= 0:
            return []
        lowest: float | str = "-inf" if since is None else since - CLOCK_SKEW
        found = await self._client.zrevrangebyscore(
            self._channels.ended, "+inf", lowest, start=0, num=limit
        )
        return [_text(c) for c in found]

    async def replay(self, call_ids: Iterable[str], since: float | None = None) -> list[Message]:
        """The calls' kept messages in time order; from `since` (less the skew) when given."""
        ids = list(dict.fromkeys(call_ids))
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for call_id in ids:
            pipe.xrange(self._channels.stream(call_id))
        lowest = 0.0 if since is None else since - CLOCK_SKEW
        found: list[Message] = []
        for entries in await pipe.execute():
            for _, fields in entries or []:
                message = Message.parse(fields.get(b"data", b""))
                if message is not None and message.emitted_at >= lowest:
                    found.append(message)
        found.sort(key=lambda m: (m.emitted_at, m.call_id, m.seq or 0))
        return found


@dataclass(eq=False)
class Follower:
    """One reader of the live feed: the calls it wants (None: all) and its queue, which holds
    at most `limit` messages and then the end marker (None)."""

    calls: frozenset[str] | None
    limit: int = FOLLOWER_BACKLOG
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    ended: str | None = None  # why the feed stopped serving it

    def offer(self, message: Message) -> None:
        if self.ended is not None:
            return
        if self.calls is not None and message.call_id not in self.calls:
            return
        if self.queue.qsize() >= self.limit:
            self.end("behind")  # what it has is kept: it resumes from its last message
            return
        self.queue.put_nowait(message)

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self.queue.put_nowait(None)


class LiveFeed:
    """One pub/sub subscription (every call's channel and the lifecycle channel) shared by all
    followers in this process; subscribed while anyone follows."""

    def __init__(self, redis_url: str, channels: events.Channels) -> None:
        self._url = redis_url
        self._channels = channels
        self._followers: set[Follower] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def followers(self) -> int:
        return len(self._followers)

    @contextlib.asynccontextmanager
    async def follow(self, calls: Iterable[str] | None = None) -> AsyncIterator[Follower]:
        """A follower registered until the block ends; entered once the feed is subscribed
        (or raises ConnectionError when Redis cannot be reached)."""
        follower = Follower(None if calls is None else frozenset(calls))
        self._followers.add(follower)
        if self._task is None or self._task.done():
            self._ready.clear()
            self._task = asyncio.create_task(self._run(), name="live-feed")
        try:
            await asyncio.wait_for(self._ready.wait(), 5.0)
        except TimeoutError:
            self._leave(follower)
            raise ConnectionError("Redis does not answer") from None
        try:
            yield follower
        finally:
            self._leave(follower)

    def _leave(self, follower: Follower) -> None:
        self._followers.discard(follower)
        if not self._followers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        for follower in list(self._followers):
            follower.end("closing")
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        client = aioredis.Redis.from_url(self._url, socket_connect_timeout=2.0)
        lifecycle = self._channels.lifecycle.encode()
        try:
            while True:
                try:
                    await self._listen(client, lifecycle)
                except (RedisError, OSError) as exc:
                    log.warning("live_feed_lost", error=repr(exc), followers=self.followers)
                except Exception:  # a bug: its followers must not wait forever either
                    log.exception("live_feed_failed", followers=self.followers)
                self._ready.clear()
                for follower in list(self._followers):
                    follower.end("gap")  # they replay what they missed on reconnecting
                await asyncio.sleep(1.0)
        finally:
            await client.aclose()

    async def _listen(self, client: aioredis.Redis, lifecycle: bytes) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.psubscribe(self._channels.all_calls)
            await pubsub.subscribe(self._channels.lifecycle)
            self._ready.set()
            while True:
                item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if item is None:
                    continue
                message = Message.parse(item["data"])
                if message is None:
                    continue
                if item["channel"] == lifecycle and message.seq is not None:
                    continue  # a call's own event: it came on the call's channel too
                for follower in list(self._followers):
                    follower.offer(message)


class Followed:
    """The calls' messages so far (`replayed`), then live ones by `next()`, without repeats.
    `seen` (each call's last seq given, updated here) carries that across resumes."""

    def __init__(
        self, follower: Follower, replayed: list[Message], seen: dict[str, int] | None = None
    ) -> None:
        self._follower = follower
        self._last_seq = {} if seen is None else seen
        self.replayed = [m for m in replayed if self._seen(m)]

    def _seen(self, message: Message) -> bool:
        """False for a message already given (a call's seq only grows)."""
        seq = message.seq
        if seq is None:
            return True
        if seq <= self._last_seq.get(message.call_id, 0):
            return False
        self._last_seq[message.call_id] = seq
        return True

    async def next(self) -> Message | None:
        """The next live message; None once the feed stops serving this follower (see
        LiveFeed). Safe to cancel: a message is taken only when it is returned."""
        while True:
            message = await self._follower.queue.get()
            if message is None:
                return None
            if self._seen(message):
                return message


class FollowSources:
    """What a process follows calls through: the shared live feed, and one client for the index
    of calls and their streams. One per process (the board's endpoint, `streamsrv tail`)."""

    def __init__(self, redis_url: str, channels: events.Channels) -> None:
        self._client = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        self.feed = LiveFeed(redis_url, channels)
        self.index = CallIndex(self._client, channels)

    async def close(self) -> None:
        """Ends every follower (see LiveFeed.close), then the connections."""
        await self.feed.close()
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def following(
        self,
        *,
        calls: Iterable[str] | None = None,
        since: float | None = None,
        recent: int = 0,
        seen: dict[str, int] | None = None,
    ) -> AsyncIterator[Followed]:
        """Follow the given calls, or every active call and the `recent` calls that ended
        last (when resuming, those that ended after `since`, less what `seen` says was given:
        see Followed). Raises ConnectionError or RedisError when Redis is away."""
        wanted = None if calls is None else list(calls)
        async with self.feed.follow(wanted) as follower:
            if wanted is None:
                ended = await self.index.ended(recent, since) if recent else []
                wanted = [*reversed(ended), *await self.index.active()]
            yield Followed(follower, await self.index.replay(wanted, since), seen)
