"""The spool on a real disk and a real Postgres: writes left by an earlier process are replayed
in order at start, and a file that cannot be read is set aside instead of blocking the rest."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from streamsrv.config import Settings
from streamsrv.jobs import JobStore
from streamsrv.records import CallStartedRow, JobRow, to_spool
from streamsrv.spool import CallStore, Spool


async def test_an_unreadable_spool_file_is_set_aside_and_the_rest_replayed(
    database_url: str, tmp_path: Path
) -> None:
    call_id = str(uuid.uuid4())
    pending = tmp_path / "pending"
    pending.mkdir()
    files = [
        to_spool(CallStartedRow(call_id, datetime.now(UTC), "127.0.0.1:1", 8000, "hybrid")),
        {"op": "drop_everything", "kwargs": {}},
        to_spool(JobRow(call_id, "/rec/x.wav")),
    ]
    for n, data in enumerate(files):
        (pending / f"{n:020d}-000000.json").write_text(json.dumps(data))
    store = CallStore(JobStore(Settings(database_url=database_url)), Spool(tmp_path))
    await store.start()
    try:
        for _ in range(100):
            if not store.spooled:
                break
            await asyncio.sleep(0.05)
        assert store.spooled == 0
    finally:
        await store.close()
    assert [p.suffix for p in sorted(pending.iterdir())] == [".unreadable"]
    conn = await asyncpg.connect(database_url)
    try:
        job = await conn.fetchval(
            "select audio_path from postcall_jobs where call_id = $1", uuid.UUID(call_id)
        )
    finally:
        await conn.close()
    assert job == "/rec/x.wav"
