"""The worker's Prometheus metrics over HTTP, from a real worker running real jobs against real
Postgres and Redis: the counters move as jobs are done, fail and are taken over, and the queue's
gauges follow Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamsrv import corpus
from streamsrv.config import Settings
from streamsrv.jobs import JobStore
from streamsrv.postcall.worker import Worker
from tests.e2e import free_port, get, make_settings
from tests.postcall_helpers import fresh_db, insert_job, shared_model, wav_bytes

__all__ = ["fresh_db"]  # a fixture, used by name


@pytest.fixture
async def conn(fresh_db: str) -> AsyncIterator[Any]:
    """A connection to this test's own database, migrated."""
    store = JobStore(Settings(database_url=fresh_db))
    await store.start()
    await store.close()
    connection = await asyncpg.connect(fresh_db)
    yield connection
    await connection.close()


async def scrape(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's GET /metrics, by name and labels."""
    assert worker.endpoint is not None
    status, text = await get(worker.endpoint.port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def queue_gauges(worker: Worker, until: dict[str, float]) -> dict[str, float]:
    """The queue gauges once they show `until` (they are read every few seconds)."""
    shown: dict[str, float] = {}
    for _ in range(120):
        samples = await scrape(worker)
        shown = {  # absent until the first read of the queue has come back
            state: samples[key]
            for state in until
            if (key := ("streamsrv_worker_queue_jobs", (("state", state),))) in samples
        }
        if shown == until:
            break
        await asyncio.sleep(0.25)
    return shown


async def test_failed_and_taken_over_jobs_move_the_counters(
    settings_env: dict[str, str], conn: Any, fresh_db: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not a recording\n" * 100)
    await insert_job(conn, str(bad))
    _, orphan = await insert_job(conn, str(bad))
    # A job whose worker died while running it: its lease has expired.
    await conn.execute(
        "update postcall_jobs set status = 'running', attempts = 1, worker = 'gone',"
        " lease_expires_at = now() - interval '1 second' where id = $1",
        orphan,
    )
    settings = make_settings(
        settings_env,
        DATABASE_URL=fresh_db,
        WORKER_METRICS_PORT=str(free_port()),
        CELERY_MAX_RETRIES="0",
    )
    worker = Worker(settings)
    await worker.start()
    try:
        before = await scrape(worker)
        assert value(before, "streamsrv_worker_jobs_claimed_total") == 0
        assert value(before, "streamsrv_worker_leases_lost_total", reason="expired") == 0
        assert await queue_gauges(worker, {"queued": 1, "running": 1}) == {
            "queued": 1,
            "running": 1,
        }

        second = Worker(settings)  # the same port: a clear error, not a worker without metrics
        with pytest.raises(OSError, match="WORKER_METRICS_PORT"):
            await second.start()

        await asyncio.wait_for(worker.serve(drain=True), 120)
        after = await scrape(worker)
        assert value(after, "streamsrv_worker_jobs_claimed_total") == 2
        assert value(after, "streamsrv_worker_jobs_failed_total") == 2
        assert value(after, "streamsrv_worker_jobs_done_total") == 0
        assert value(after, "streamsrv_worker_jobs_running") == 0
        assert value(after, "streamsrv_worker_leases_lost_total", reason="expired") == 1
        assert value(after, "streamsrv_worker_leases_lost_total", reason="taken") == 0
        # what its log lines say is read from the same counters
        assert worker.metrics.totals() == {"done": 0, "retried": 0, "failed": 2, "lost": 1}
        # the orphan is failed unread: its lease expired more often than retries allow
        assert value(after, "streamsrv_worker_stage_duration_seconds_count", stage="read") == 1
        assert value(after, "streamsrv_worker_job_duration_seconds_count") == 0
        states = {"queued": 0, "running": 0, "failed": 2, "done_last_hour": 0}
        assert await queue_gauges(worker, states) == states
    finally:
        await worker.close()
    assert await conn.fetchval("select count(*) from postcall_jobs where status = 'failed'") == 2


async def test_a_real_job_done_then_from_the_cache(
    settings_env: dict[str, str], conn: Any, fresh_db: str, model_dir: Path, tmp_path: Path
) -> None:
    call = corpus.build_call(corpus.pick_prompts(2, 11), pause=1.0)
    recording = tmp_path / "call.wav"
    recording.write_bytes(wav_bytes(call.pcm, corpus.RATE))
    await insert_job(conn, str(recording))
    settings = make_settings(
        settings_env, DATABASE_URL=fresh_db, WORKER_METRICS_PORT=str(free_port())
    )
    worker = Worker(settings, shared_model(model_dir))
    await worker.start()
    try:
        await asyncio.wait_for(worker.serve(drain=True), 300)
        first = await scrape(worker)
        assert value(first, "streamsrv_worker_jobs_claimed_total") == 1
        assert value(first, "streamsrv_worker_jobs_done_total") == 1
        assert value(first, "streamsrv_worker_jobs_failed_total") == 0
        assert value(first, "streamsrv_worker_job_duration_seconds_count") == 1
        for stage in ("read", "decode", "transcribe", "insights", "write"):
            count = "streamsrv_worker_stage_duration_seconds_count"
            assert value(first, count, stage=stage) == 1, stage
        assert value(first, "streamsrv_worker_stage_duration_seconds_count", stage="translate") == 0
        transcribe = value(first, "streamsrv_worker_stage_duration_seconds_sum", stage="transcribe")
        assert transcribe > 0
        states = {"queued": 0, "running": 0, "done_last_hour": 1}
        assert await queue_gauges(worker, states) == states

        # The same recording again: done from the cache, the model's stages untouched.
        await insert_job(conn, str(recording))
        await asyncio.wait_for(worker.serve(drain=True), 300)
        second = await scrape(worker)
        assert value(second, "streamsrv_worker_jobs_done_total") == 2
        assert value(second, "streamsrv_worker_stage_duration_seconds_count", stage="read") == 2
        assert (
            value(second, "streamsrv_worker_stage_duration_seconds_count", stage="transcribe") == 1
        )
        assert value(second, "streamsrv_worker_stage_duration_seconds_count", stage="write") == 2
    finally:
        await worker.close()
