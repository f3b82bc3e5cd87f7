"""A Server-Sent Events reader for tests: what a browser's EventSource would hand a page."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class SseEvent:
    id: str | None  # the id field of this event, if it had one
    last_id: str  # the id a reconnecting client would send (EventSource's lastEventId)
    data: dict[str, Any]


class SseReader:
    """Opens GET /events and parses its events; `events` grows as they arrive."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: list[SseEvent] = []
        self.comments = 0
        self.status = 0
        self.content_type = ""
        self.last_id = ""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self.closed_by_server = False

    async def __aenter__(self) -> SseReader:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        response = await self._session.get(self.url, headers=self.headers)
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "")
        self._task = asyncio.create_task(self._read(response))
        return self

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        event_id: str | None = None
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "":
                if data:
                    if event_id is not None:
                        self.last_id = event_id
                    self.events.append(SseEvent(event_id, self.last_id, json.loads("".join(data))))
                    self._arrived.set()
                event_id, data = None, []
        self.closed_by_server = True
        self._arrived.set()

    def messages(self, call_id: str | None = None) -> list[dict[str, Any]]:
        return [e.data for e in self.events if call_id is None or e.data["call_id"] == call_id]

    async def wait_for(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """Until at least `count` events have arrived (or the stream ended)."""

        async def enough() -> None:
            while len(self.events) < count and not self.closed_by_server:
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(enough(), within)
        return self.messages()

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await self._task
        if self._session is not None:
            await self._session.close()
