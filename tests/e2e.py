"""Helpers for end-to-end tests: a real Server on the test's loop, and a Redis collector."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis

from streamsrv.config import Settings
from streamsrv.server import Server
from streamsrv.simulate import CallWatcher


def make_settings(env: dict[str, str], **overrides: str) -> Settings:
    """Settings for one test: its own channel prefix, ports chosen by the kernel."""
    values = {**env, "REDIS_CHANNEL_PREFIX": f"t{secrets.token_hex(4)}:", **overrides}
    return Settings.from_mapping(values)


@contextlib.asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[Server]:
    server = Server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.drain()
        await server.close()


class Collector:
    """Every message of every call under a prefix, per call, in arrival order."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.redis_channel_prefix
        self.watcher = CallWatcher(settings.redis_url, f"{self.prefix}call*")
        self.by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.lifecycle: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Collector:
        await self.watcher.__aenter__()
        self._task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):  # Redis stopped by the test
            await self._collect_until_error()

    async def _collect_until_error(self) -> None:
        async for channel, message in self.watcher.channel_messages():
            if channel == f"{self.prefix}calls":
                self.lifecycle.append(message)
            else:
                self.by_call[message["call_id"]].append(message)
            self._arrived.set()

    async def wait_ended(self, call_ids: list[str], within: float = 120.0) -> None:
        await self._wait_until(
            lambda: all(
                self.by_call[c] and self.by_call[c][-1]["type"] == "call_ended" for c in call_ids
            ),
            within,
        )

    async def wait_message(self, call_id: str, kind: str, within: float) -> dict[str, Any]:
        """The call's first message of type `kind`, once it has arrived."""
        await self._wait_until(
            lambda: any(m["type"] == kind for m in self.by_call[call_id]), within
        )
        return next(m for m in self.by_call[call_id] if m["type"] == kind)

    async def _wait_until(self, condition: Callable[[], bool], within: float) -> None:
        async def until() -> None:
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(until(), within)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.watcher.__aexit__()


def recording_path(settings: Settings, call_id: str) -> Path:
    found = list(Path(settings.recordings_dir).rglob(f"{call_id}.wav"))
    assert len(found) == 1, found
    return found[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    """GET from a server's HTTP port on loopback: (status, body)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def call_and_job(database_url: str, call_id: str) -> Any:
    """The call's row joined with its post-call job: `status` (the call's), `id`, `job` (its
    status) and `audio_path`; None if either is missing."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(
            "select c.status, j.id, j.status as job, j.audio_path from calls c"
            " join postcall_jobs j using (call_id) where call_id = $1",
            uuid.UUID(call_id),
        )
    finally:
        await conn.close()
