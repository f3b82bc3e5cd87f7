"""Plays a call into streamsrv the way Asterisk does, and watches its transcript on Redis.

Used by `streamsrv demo`, the end-to-end tests and the benchmarks: connect, send the call id,
then 20 ms audio frames paced in real time (or `speed` times faster), DTMF where asked, and close
the socket at the end, as Asterisk hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from streamsrv import audiosocket as aso


@dataclass
class PlayedCall:
    call_id: str
    bytes_sent: int = 0
    frames_sent: int = 0


async def play_call(
    host: str,
    port: int,
    pcm: bytes,
    *,
    call_id: str | None = None,
    rate: int = 8000,
    kind: int = aso.Kind.AUDIO_8K,
    frame_ms: int = 20,
    speed: float = 1.0,
    dtmf: list[tuple[float, str]] | None = None,
) -> PlayedCall:
    """Send one call; returns what was sent. `dtmf` is (seconds into the audio, digit)."""
    played = PlayedCall(call_id or str(uuid.uuid4()))
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(aso.encode(aso.CallId(played.call_id)))
    frame = rate * frame_ms // 1000 * 2
    keys = sorted(dtmf or [])
    t0 = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), frame)):
        at = i * frame_ms / 1000
        while keys and keys[0][0] <= at:
            writer.write(aso.encode(aso.Dtmf(keys.pop(0)[1])))
        chunk = pcm[offset : offset + frame]
        writer.write(aso.encode(aso.Audio(kind, chunk)))
        played.bytes_sent += len(chunk)
        played.frames_sent += 1
        delay = t0 + (i + 1) * frame_ms / 1000 / speed - time.monotonic()
        if delay > 0:
            await writer.drain()
            await asyncio.sleep(delay)
    for _, digit in keys:
        writer.write(aso.encode(aso.Dtmf(digit)))
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    return played


class CallWatcher:
    """Subscribes to calls' channels (before they are played) and yields their messages.

    `pattern` is a channel pattern: one call's channel, or `<prefix>call:*` for all calls."""

    def __init__(self, redis_url: str, pattern: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._pattern = pattern

    async def __aenter__(self) -> CallWatcher:
        await self._pubsub.psubscribe(self._pattern)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(redis.RedisError, OSError):  # Redis may be gone by now
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await self._client.aclose()

    async def channel_messages(
        self, idle: float = 300.0
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(channel, message) as they arrive, until `idle` seconds pass with none."""
        deadline = time.monotonic() + idle
        while time.monotonic() < deadline:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:  # None: nothing yet, or a subscribe confirmation
                deadline = time.monotonic() + idle
                yield message["channel"].decode(), json.loads(message["data"])

    async def messages(self, idle: float = 300.0) -> AsyncIterator[dict[str, Any]]:
        async for _, message in self.channel_messages(idle):
            yield message


class LiveView:
    """A call's live transcript: every final, plus the latest partial of the open segment."""

    def __init__(self) -> None:
        self.finals: dict[int, str] = {}
        self.partial: tuple[int, str] | None = None

    def apply(self, message: dict[str, Any]) -> None:
        if message["type"] == "final":
            self.finals[message["segment"]] = message["text"]
            if self.partial and self.partial[0] == message["segment"]:
                self.partial = None
        elif message["type"] == "partial":
            self.partial = (message["segment"], message["text"])

    @property
    def text(self) -> str:
        parts = [self.finals[k] for k in sorted(self.finals) if self.finals[k]]
        if self.partial:
            parts.append(self.partial[1])
        return " ".join(parts)
