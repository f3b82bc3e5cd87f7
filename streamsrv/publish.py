"""Redis publishing of call events that never blocks the caller and survives Redis outages.

publish() only encodes and enqueues. One sender task drains the backlog in batches, each batch
one MULTI/EXEC round trip, so a batch is applied entirely or not at all and a retried batch is not
duplicated (the only exception: a connection lost after EXEC reached Redis but before its reply).
Before each round trip the sender lingers 10 ms for other messages to join the batch: a round
trip costs far more than a message in it (ingest of 300 calls of 3 s: about 1.2 ms less CPU per
call), and 10 ms is nothing next to the seconds a partial or final takes to make.
While Redis is down messages wait in a bounded FIFO; a waiting partial is dropped as soon as a
newer message of its call exists, so an outage never replays stale partials.

The same transactions keep the index of calls that boards and `streamsrv tail` start from
(streamsrv.follow): a call enters the `active` hash with its call_started and leaves it for the
`ended` sorted set with its call_ended; a heartbeat key, refreshed every few seconds, tells
readers which servers still run, so the calls of a server that died are not shown as live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from streamsrv import events
from streamsrv.config import Settings

log = structlog.get_logger(__name__)

PARTIAL = events.Partial.TYPE
STARTED = events.CallStarted.TYPE
ENDED = events.CallEnded.TYPE
HEARTBEAT_SECONDS = 5.0  # a server's heartbeat key lives 3 times as long
ENDED_KEPT = 500  # calls kept in the `ended` index


def server_id() -> str:
    """This process among the servers that share a Redis."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True, eq=False)
class _Entry:
    call_id: str
    kind: str
    payload: str
    lifecycle: bool
    queued: bool = True  # False once dropped or taken out for sending
    conversation: str | None = None  # a conversation's copy: its channel and stream only


class _Backlog:
    """FIFO of waiting messages, bounded, shedding partials first; amortised O(1) per message.

    Removed entries are only flagged (queued=False) and swept lazily, so dropping a partial in
    the middle of the queue costs nothing.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: deque[_Entry] = deque()
        self._partials: deque[_Entry] = deque()  # partials in queue order, swept lazily
        self._last_partial: dict[str, _Entry] = {}  # call -> its newest queued partial
        self._size = 0
        self.superseded = 0  # partials dropped because a newer message of the call exists
        self.dropped = 0  # messages dropped because the backlog was full

    def __len__(self) -> int:
        return self._size

    def push(self, entry: _Entry, *, coalesce: bool) -> _Entry | None:
        """Queue entry; returns a non-partial message dropped for room, if one was."""
        if coalesce:
            previous = self._last_partial.pop(entry.call_id, None)
            if previous is not None and previous.queued:
                self._remove(previous)
                self.superseded += 1
        lost = None
        if self._size >= self._capacity:
            if entry.kind == PARTIAL and not self._oldest_partial():
                self.dropped += 1
                return None
            lost = self._make_room()
        self._append(entry)
        if len(self._entries) > 2 * self._capacity + 64:
            self._rebuild([e for e in self._entries if e.queued])
        return lost

    def take(self, limit: int) -> list[_Entry]:
        """Remove and return up to limit messages from the front, oldest first."""
        batch: list[_Entry] = []
        while self._entries and len(batch) < limit:
            entry = self._entries.popleft()
            if entry.queued:
                self._remove(entry)
                batch.append(entry)
        while self._partials and not self._partials[0].queued:
            self._partials.popleft()  # taken or dropped: keep the index from growing
        return batch

    def requeue(self, batch: list[_Entry]) -> list[_Entry]:
        """Put an unsent batch back in front, then coalesce; returns non-partials dropped."""
        kept = [*batch, *(e for e in self._entries if e.queued)]
        for entry in batch:
            entry.queued = True
        self._rebuild(kept)
        return self.coalesce()

    def coalesce(self) -> list[_Entry]:
        """Drop every partial followed by a newer message of its call; enforce the bound."""
        seen: set[str] = set()
        kept: list[_Entry] = []
        for entry in reversed(self._entries):
            if not entry.queued:
                continue
            if entry.kind == PARTIAL and entry.call_id in seen:
                entry.queued = False
                self.superseded += 1
                continue
            seen.add(entry.call_id)
            kept.append(entry)
        kept.reverse()
        self._rebuild(kept)
        lost: list[_Entry] = []
        while self._size > self._capacity:
            victim = self._make_room()
            if victim is not None:
                lost.append(victim)
        return lost

    def _make_room(self) -> _Entry | None:
        """Drop the oldest partial, else the oldest message (returned)."""
        self.dropped += 1
        partial = self._oldest_partial()
        if partial is not None:
            self._remove(partial)
            return None
        while not self._entries[0].queued:
            self._entries.popleft()
        oldest = self._entries.popleft()
        self._remove(oldest)
        return oldest

    def _oldest_partial(self) -> _Entry | None:
        while self._partials and not self._partials[0].queued:
            self._partials.popleft()
        return self._partials[0] if self._partials else None

    def _append(self, entry: _Entry) -> None:
        entry.queued = True
        self._entries.append(entry)
        self._size += 1
        if entry.kind == PARTIAL:
            self._partials.append(entry)
            self._last_partial[entry.call_id] = entry

    def _remove(self, entry: _Entry) -> None:
        entry.queued = False
        self._size -= 1
        if self._last_partial.get(entry.call_id) is entry:
            del self._last_partial[entry.call_id]

    def _rebuild(self, entries: list[_Entry]) -> None:
        self._entries.clear()
        self._partials.clear()
        self._last_partial.clear()
        self._size = 0
        for entry in entries:
            self._append(entry)


class Publisher:
    """Publishes call events to Redis pub/sub and per-call streams; see the module docstring.

    publish() must be called from the event loop's thread.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int = 256,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        ping_interval: float = 5.0,
        linger: float = 0.01,
    ) -> None:
        self._url = settings.redis_url
        self._channels = events.Channels(settings.redis_channel_prefix)
        self._stream_maxlen = settings.redis_stream_maxlen
        self._stream_ttl = settings.redis_stream_ttl
        self._batch_size = batch_size
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._ping_interval = ping_interval
        self._linger = linger
        self._backlog = _Backlog(settings.redis_backlog)
        self._wake = asyncio.Event()
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = False
        self._down_since = time.monotonic()
        self._closing = False
        self._loss_logged = False
        self._abandoned = 0
        self._server = server_id()
        self._beaten = -HEARTBEAT_SECONDS  # monotonic time of the last heartbeat sent
        self.published = 0

    @property
    def status(self) -> str:
        return "ok" if self._up else "down"

    @property
    def dropped(self) -> int:
        """Messages that will never be published (backlog full, unencodable, left at close)."""
        return self._backlog.dropped + self._abandoned

    @property
    def superseded(self) -> int:
        """Partials skipped during an outage because a newer message of the call existed."""
        return self._backlog.superseded

    @property
    def queued(self) -> int:
        return len(self._backlog)

    async def start(self) -> None:
        """Connect and start sending; a Redis that is down now is retried in the background."""
        # No client-side retries: a retried MULTI/EXEC could publish twice; _run retries instead.
        self._client = aioredis.Redis.from_url(
            self._url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
        )
        if await self._probe():
            self._up = True
            log.info("redis_connected")
        else:
            log.warning("redis_down", url=_safe_url(self._url), backlog=len(self._backlog))
        self._task = asyncio.create_task(self._run(), name="redis-publisher")

    def emit(self, event: events.Event, seq: int | None = None) -> dict[str, Any]:
        """Publish one event (see streamsrv.events for where it goes); never blocks.
        Returns the message as published."""
        message = events.encode(event, seq)
        self.publish(event.call_id, message, lifecycle=event.LIFECYCLE)
        return message

    async def conversation_so_far(self, conversation: str) -> list[dict[str, Any]]:
        """A conversation's finals kept in its stream, in time order ([] if Redis is away);
        its alerts, kept there too, are left out."""
        if self._client is None:
            return []
        try:
            entries = await self._client.xrange(self._channels.conversation_stream(conversation))
        except (RedisError, OSError) as exc:
            log.warning("conversation_unreadable", conversation=conversation, error=repr(exc))
            return []
        kept = [json.loads(f[b"data"]) for _, f in entries or [] if f and b"data" in f]
        return [m for m in kept if m.get("type") == "final"]

    def publish_conversation(self, conversation: str, message: dict[str, Any]) -> None:
        """A final or an alert, again, on its conversation's channel and stream
        (streamsrv.conversation)."""
        self._enqueue(message, False, conversation)

    def publish(self, call_id: str, message: dict[str, Any], *, lifecycle: bool = False) -> None:
        """Encode and enqueue; never blocks, never raises."""
        self._enqueue(message, lifecycle, None, call_id)

    def _enqueue(
        self,
        message: dict[str, Any],
        lifecycle: bool,
        conversation: str | None,
        call_id: str | None = None,
    ) -> None:
        call_id = call_id if call_id is not None else str(message.get("call_id", ""))
        try:
            payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
            kind = str(message.get("type", ""))
            entry = _Entry(call_id, kind, payload, lifecycle, conversation=conversation)
            lost = self._backlog.push(entry, coalesce=not self._up)
            if lost is not None:
                self._log_loss([lost])
            self._wake.set()
        except Exception:
            self._abandoned += 1
            log.exception("publish_failed", call_id=call_id)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (the API asks for it)
        """Send what is queued for up to timeout seconds, then stop; the rest is dropped."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = len(self._backlog)
        if left:
            self._abandoned += left
            self._backlog.take(left)
            log.warning("redis_backlog_abandoned", messages=left)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._up = False

    async def _run(self) -> None:
        backoff = self._min_backoff
        while True:
            if not self._up:
                if self._closing and not self._backlog:
                    return
                if not await self._probe():
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                backoff = self._min_backoff
                self._mark_up()
            if len(self._backlog) < self._batch_size and not self._closing:
                await asyncio.sleep(self._linger)  # let the messages of other calls join
            batch = self._backlog.take(self._batch_size)
            if not batch:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    idle = min(self._ping_interval, HEARTBEAT_SECONDS)
                    await asyncio.wait_for(self._wake.wait(), idle)
                if not self._wake.is_set() and not await self._probe():
                    self._mark_down("ping failed", [])
                continue
            try:
                await self._send(batch)
            except (RedisError, OSError) as exc:
                self._mark_down(repr(exc), batch)
                continue
            except asyncio.CancelledError:
                self._backlog.requeue(batch)
                raise
            except Exception:  # a bug, not an outage: drop the batch rather than loop on it
                self._abandoned += len(batch)
                log.exception("redis_batch_failed", messages=len(batch))
                continue
            self.published += len(batch)
            if not self._backlog:
                self._loss_logged = False

    async def _send(self, batch: list[_Entry]) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=True)
        streams: dict[str, None] = {}
        for entry in batch:
            if entry.conversation is not None:
                key = self._channels.conversation_stream(entry.conversation)
                pipe.publish(self._channels.conversation(entry.conversation), entry.payload)
                pipe.xadd(key, {"data": entry.payload}, maxlen=self._stream_maxlen)
                streams[key] = None
                continue
            pipe.publish(self._channels.call(entry.call_id), entry.payload)
            if entry.lifecycle:
                pipe.publish(self._channels.lifecycle, entry.payload)
            if entry.kind == STARTED:
                pipe.hset(self._channels.active, entry.call_id, self._server)
            elif entry.kind == ENDED:
                pipe.hdel(self._channels.active, entry.call_id)
                pipe.zadd(self._channels.ended, {entry.call_id: time.time()})
                pipe.zremrangebyrank(self._channels.ended, 0, -ENDED_KEPT - 1)
            if entry.kind in events.STREAMED_TYPES:
                key = self._channels.stream(entry.call_id)
                pipe.xadd(key, {"data": entry.payload}, maxlen=self._stream_maxlen)
                streams[key] = None
        for key in streams:
            pipe.expire(key, self._stream_ttl)
        self._beat(pipe)
        results = await pipe.execute(raise_on_error=False)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            # Applied by EXEC already (e.g. WRONGTYPE on a stream key): retrying cannot help.
            log.error("redis_command_failed", errors=len(errors), error=repr(errors[0]))

    async def _probe(self) -> bool:
        """Is Redis there? The heartbeat, when one is due, is the probe."""
        assert self._client is not None
        try:
            if self._heartbeat_due():
                pipe = self._client.pipeline(transaction=False)
                self._beat(pipe)
                await pipe.execute()
            else:
                await self._client.ping()
        except (RedisError, OSError):
            return False
        return True

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self._beaten >= HEARTBEAT_SECONDS

    def _beat(self, pipe: Any) -> None:
        """Add this server's heartbeat to a pipeline when one is due."""
        if self._heartbeat_due():
            self._beaten = time.monotonic()
            ttl = int(3 * HEARTBEAT_SECONDS)
            pipe.set(self._channels.server(self._server), "1", ex=ttl)

    def _mark_up(self) -> None:
        self._up = True
        log.info(
            "redis_reconnected",
            down_s=round(time.monotonic() - self._down_since, 3),
            backlog=len(self._backlog),
            dropped=self.dropped,
        )

    def _mark_down(self, error: str, unsent: list[_Entry]) -> None:
        """Enter the outage state: put back what was not sent, drop stale partials."""
        lost = self._backlog.requeue(unsent)
        if self._up:
            self._up = False
            self._down_since = time.monotonic()
            log.warning("redis_down", error=error, backlog=len(self._backlog))
        if lost:
            self._log_loss(lost)

    def _log_loss(self, lost: list[_Entry]) -> None:
        if self._loss_logged:
            return
        self._loss_logged = True
        log.error(
            "redis_backlog_full",
            dropped_type=lost[0].kind,
            call_id=lost[0].call_id,
            backlog=len(self._backlog),
            hint="messages are being lost until Redis catches up; see the dropped counter",
        )


def _safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
