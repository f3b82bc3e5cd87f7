"""JobStore and migrations against a real Postgres database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from streamsrv.config import Settings
from streamsrv.jobs import MIGRATIONS, JobStore, migrate, run_migrations


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    store = JobStore(Settings(database_url=database_url))
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def test_migrate_twice_is_harmless_and_creates_schema(database_url: str, conn: Any) -> None:
    await run_migrations(database_url)
    await migrate(conn)
    await migrate(conn)
    assert await conn.fetchval("select count(*) from schema_version") == len(MIGRATIONS)
    tables = {
        r["tablename"]
        for r in await conn.fetch("select tablename from pg_tables where schemaname = 'public'")
    }
    assert {"schema_version", "calls", "postcall_jobs"} <= tables
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await conn.fetch("select indexname, indexdef from pg_indexes")
    }
    assert "(created_at)" in indexes["calls_created_at_idx"]
    assert "(status, priority DESC, created_at)" in indexes["postcall_jobs_claim_idx"]


async def test_concurrent_migrations_are_safe(database_url: str) -> None:
    name = f"streamsrv_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'create database "{name}"')
    url = urlsplit(database_url)._replace(path="/" + name).geturl()
    try:
        conns = [await asyncpg.connect(url) for _ in range(4)]
        try:
            await asyncio.gather(*(migrate(c) for c in conns))
            assert await conns[0].fetchval("select count(*) from schema_version") == len(MIGRATIONS)
        finally:
            for c in conns:
                await c.close()
    finally:
        await admin.execute(f'drop database "{name}" with (force)')
        await admin.close()


async def test_concurrent_store_starts_are_safe(database_url: str) -> None:
    stores = [JobStore(Settings(database_url=database_url)) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))
    assert all([await s.check() == "ok" for s in stores])
    await asyncio.gather(*(s.close() for s in stores))


async def test_call_lifecycle(store: JobStore, conn: Any) -> None:
    call_id = str(uuid.uuid4())
    started = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    await store.calls.started(call_id, started, "10.0.0.7:5000", 8000, "hybrid")
    await store.calls.started(call_id, started + timedelta(hours=1), "other", 16000, "x")
    row = await conn.fetchrow("select * from calls where call_id = $1", call_id)
    assert (row["created_at"], row["peer"], row["sample_rate"]) == (started, "10.0.0.7:5000", 8000)
    assert (row["status"], row["dtmf"], row["live_transcript"]) == ("active", "", "")
    assert row["ended_at"] is None and row["processing_mode"] == "hybrid"

    ended = started + timedelta(seconds=42.5)
    await store.calls.finished(
        call_id, ended, 42.5, "12#", "hello there", "en", "ended", None, None
    )
    row = await conn.fetchrow("select * from calls where call_id = $1", call_id)
    assert (row["ended_at"], row["duration_s"], row["dtmf"]) == (ended, 42.5, "12#")
    assert (row["live_transcript"], row["language"], row["status"]) == (
        "hello there",
        "en",
        "ended",
    )
    assert row["created_at"] == started


async def test_call_ended_without_start_creates_row(store: JobStore, conn: Any) -> None:
    call_id = str(uuid.uuid4())
    ended = datetime(2024, 5, 1, 12, 0, 10, tzinfo=UTC)
    await store.calls.finished(call_id, ended, 10.0, "", "", None, "interrupted", None, None)
    row = await conn.fetchrow("select * from calls where call_id = $1", call_id)
    assert row["created_at"] == ended - timedelta(seconds=10)
    assert row["status"] == "interrupted"


async def test_bad_status_is_rejected(store: JobStore) -> None:
    call_id = str(uuid.uuid4())
    with pytest.raises(asyncpg.CheckViolationError):
        await store.calls.finished(
            call_id, datetime.now(UTC), 1.0, "", "", None, "bogus", None, None
        )


async def test_enqueue_job_once(store: JobStore, conn: Any) -> None:
    call_id = str(uuid.uuid4())
    await store.calls.started(call_id, datetime.now(UTC), "peer", 8000, "hybrid")
    first = await store.jobs.enqueue(call_id, "/rec/a.wav", priority=5)
    second = await store.jobs.enqueue(call_id, "/rec/other.wav")
    assert first == second
    rows = await conn.fetch("select * from postcall_jobs where call_id = $1", call_id)
    assert len(rows) == 1
    job = rows[0]
    assert (job["id"], job["status"], job["priority"], job["attempts"]) == (first, "queued", 5, 0)
    assert job["audio_path"] == "/rec/a.wav" and job["error"] is None
    assert job["created_at"] is not None and job["updated_at"] is not None


async def test_concurrent_enqueue_returns_one_id(store: JobStore) -> None:
    call_id = str(uuid.uuid4())
    await store.calls.started(call_id, datetime.now(UTC), "peer", 8000, "hybrid")
    ids = await asyncio.gather(*(store.jobs.enqueue(call_id, "/rec/x.wav") for _ in range(8)))
    assert len(set(ids)) == 1


async def test_check(store: JobStore) -> None:
    assert await store.check() == "ok"
    down = JobStore(Settings(database_url="postgresql://localhost:1/nothing"))
    assert await down.check() == "down"
