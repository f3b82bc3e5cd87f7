"""GET /queue and the queue in GET /health, from a real server against a real Postgres holding
jobs in every state; then with Postgres hanging (a relay that stops answering): /queue says
503, /health still answers, with the queue unavailable."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.e2e import get, make_settings, running_server
from tests.postcall_helpers import fresh_db, insert_job

__all__ = ["fresh_db"]  # a fixture, used by name

pytestmark = pytest.mark.e2e


class Relay:
    """TCP between the server and Postgres that can be frozen: bytes stop flowing both ways
    and nothing is closed, as when Postgres hangs."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # hold it: never sent, never closed
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def put(conn: Any, status: str, ago: float, **columns: Any) -> int:
    """A job in `status`, last changed `ago` seconds ago, with the given columns set."""
    _, job_id = await insert_job(conn, "/nowhere.wav")
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=4))
    await conn.execute(
        "update postcall_jobs set status = $2,"
        " updated_at = now() - make_interval(secs => $3)"
        + (f", {sets}" if sets else "")
        + " where id = $1",
        job_id,
        status,
        float(ago),
        *columns.values(),
    )
    return job_id


async def health_queue(port: int, until: Any) -> dict[str, Any]:
    """/health's body once its queue is `until` (read in the background every few seconds);
    the last body when that does not come."""
    body: dict[str, Any] = {}
    for _ in range(120):
        status, text = await get(port, "/health")
        assert status == 200, text
        body = json.loads(text)
        if body["queue"] == until:
            break
        await asyncio.sleep(0.25)
    return body


async def test_queue_and_health_show_the_jobs_then_postgres_hangs(
    settings_env: dict[str, str], fresh_db: str
) -> None:
    parts = urlsplit(fresh_db)
    async with Relay((parts.hostname or "127.0.0.1", parts.port or 5432)) as relay:
        auth = parts.netloc.rpartition("@")[0]  # user (and password) as given, if any
        relayed = fresh_db.replace(
            parts.netloc, f"{auth}@127.0.0.1:{relay.port}" if auth else f"127.0.0.1:{relay.port}"
        )
        settings = make_settings(
            settings_env, DATABASE_URL=relayed, DEFAULT_PROCESSING_MODE="postcall_only"
        )
        async with running_server(settings) as server, connected(fresh_db) as conn:
            port = server.http_port
            status, text = await get(port, "/queue")
            assert status == 200
            assert json.loads(text) == {
                "queued": 0,
                "running": 0,
                "failed": 0,
                "done_last_hour": 0,
                "failed_recent": [],
                "workers": [],
            }
            for _ in range(2):
                await insert_job(conn, "/nowhere.wav")  # queued
            live = "now() + interval '1 minute'"
            await put(conn, "running", 0, worker="w-a")
            await conn.execute(
                f"update postcall_jobs set lease_expires_at = {live} where worker = 'w-a'"
            )
            await put(conn, "running", 120, worker="w-b")  # its lease long expired
            await conn.execute(
                "update postcall_jobs set lease_expires_at = now() - interval '1 minute'"
                " where worker = 'w-b'"
            )
            failed = [
                await put(conn, "failed", ago, worker="w-a", error=f"error {ago}")
                for ago in (180, 60, 240)
            ]
            for _ in range(2):
                await put(conn, "done", 600, worker="w-b")
            await put(conn, "done", 7200, worker="w-old")  # over an hour ago: not counted

            status, text = await get(port, "/queue")
            assert status == 200
            queue = json.loads(text)
            counts = {"queued": 2, "running": 2, "failed": 3, "done_last_hour": 2}
            assert {k: queue[k] for k in counts} == counts
            assert set(queue) == {*counts, "failed_recent", "workers"}

            rows = await conn.fetch(
                "select id, call_id, error, updated_at from postcall_jobs where id = any($1)"
                " order by updated_at desc",
                failed,
            )
            assert [f["job_id"] for f in queue["failed_recent"]] == [str(r["id"]) for r in rows]
            for shown, row in zip(queue["failed_recent"], rows, strict=True):
                assert set(shown) == {"job_id", "call_id", "error", "failed_at"}
                assert (shown["call_id"], shown["error"]) == (str(row["call_id"]), row["error"])
                assert datetime.fromisoformat(shown["failed_at"]) == row["updated_at"]

            seen = await conn.fetch(
                "select worker, max(updated_at) as last from postcall_jobs"
                " where worker in ('w-a', 'w-b') group by worker order by last desc"
            )
            assert [w["worker"] for w in queue["workers"]] == ["w-a", "w-b"]
            assert [w["running"] for w in queue["workers"]] == [1, 0]  # w-b's lease expired
            for shown, row in zip(queue["workers"], seen, strict=True):
                assert set(shown) == {"worker", "last_seen", "running"}
                assert datetime.fromisoformat(shown["last_seen"]) == row["last"]

            body = await health_queue(port, counts)
            assert body["queue"] == counts and body["postgres"] == "ok"

            relay.frozen.set()  # Postgres stops answering, nothing is closed
            body = await health_queue(port, "unavailable")
            assert body["queue"] == "unavailable" and body["postgres"] == "down"
            status, text = await get(port, "/queue")
            assert (status, json.loads(text)) == (503, {"error": "database unavailable"})
