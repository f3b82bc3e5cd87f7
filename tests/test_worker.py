"""The post-call worker against real Postgres, Redis and the bundled base model: claiming,
priorities, leases, retries, --drain, and a real job end to end (with the result cache)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from streamsrv import corpus
from streamsrv.config import Settings
from streamsrv.jobs import JobStore
from streamsrv.postcall.transcribe import Outcome, PostcallModel
from streamsrv.postcall.worker import Worker, abandoned_jobs
from streamsrv.repositories import JobRepository
from streamsrv.wer import wer
from tests.e2e import make_settings
from tests.postcall_helpers import drain, fresh_db, insert_job, lifecycle, shared_model, wav_bytes

__all__ = ["fresh_db"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def conn(fresh_db: str) -> AsyncIterator[Any]:
    """A connection to this test's own database, migrated."""
    connection = await asyncpg.connect(fresh_db)
    store = JobStore(Settings(database_url=fresh_db))
    await store.start()
    await store.close()
    yield connection
    await connection.close()


@contextlib.asynccontextmanager
async def queues(settings: Settings, count: int) -> AsyncIterator[list[JobRepository]]:
    """`count` claimers, each with its own connection pool, as separate workers would be."""
    stores = [JobStore(settings) for _ in range(count)]
    await asyncio.gather(*(store.start() for store in stores))
    try:
        yield [JobRepository(store, settings, f"w{i}") for i, store in enumerate(stores)]
    finally:
        await asyncio.gather(*(store.close() for store in stores))


def outcome() -> Outcome:
    return Outcome("text", [], "en", None, None, "test", {"audio_seconds": 1.0})


async def test_concurrent_claimers_never_share_a_job(conn: Any, fresh_db: str) -> None:
    ids = [(await insert_job(conn, f"/nowhere/{i}.wav"))[1] for i in range(40)]
    settings = Settings(database_url=fresh_db)
    async with queues(settings, 4) as claimers:

        async def claim_all(queue: JobRepository) -> list[int]:
            taken: list[int] = []
            while jobs := await queue.claim(3):
                taken += [job.id for job in jobs]
                await asyncio.sleep(0)
            return taken

        per_claimer = await asyncio.gather(*(claim_all(q) for q in claimers))
    claimed = Counter(job for taken in per_claimer for job in taken)
    assert sorted(claimed) == sorted(ids)
    assert set(claimed.values()) == {1}
    assert sum(1 for taken in per_claimer if taken) >= 2  # they really competed
    rows = await conn.fetch("select status, attempts, worker, lease_expires_at from postcall_jobs")
    assert {(r["status"], r["attempts"]) for r in rows} == {("running", 1)}
    assert all(r["lease_expires_at"] > datetime.now(UTC) for r in rows)


@pytest.mark.parametrize("by_priority", [True, False])
async def test_claim_order(conn: Any, fresh_db: str, by_priority: bool) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    spec = [(0, 0), (5, 1), (1, 2), (5, 3), (-2, 4), (1, 5)]  # (priority, minutes after t0)
    ids = [
        (await insert_job(conn, "/x.wav", priority=p, created_at=t0 + timedelta(minutes=m)))[1]
        for p, m in spec
    ]
    settings = Settings(database_url=fresh_db, queue_priority_enabled=by_priority)
    expected = [ids[1], ids[3], ids[2], ids[5], ids[0], ids[4]] if by_priority else ids
    async with queues(settings, 1) as (queue,):
        one_by_one = [(await queue.claim(1))[0].id for _ in ids[:3]]
        rest = [job.id for job in await queue.claim(10)]
    assert one_by_one + rest == expected


async def test_expired_lease_is_taken_again_and_fences_the_old_holder(
    conn: Any, fresh_db: str
) -> None:
    _, job_id = await insert_job(conn, "/x.wav")
    settings = Settings(database_url=fresh_db)
    async with queues(settings, 2) as (first, second):
        (held,) = await first.claim(1)
        assert await second.claim(1) == []  # a live lease is respected
        assert await first.renew(held)
        await conn.execute(
            "update postcall_jobs set lease_expires_at = now() - interval '1 second'"
        )  # the holder died: nobody renewed
        assert await second.waiting() == (1, 0.0)
        (taken,) = await second.claim(1)
        assert (taken.id, taken.attempts) == (job_id, 2)
        assert not await first.renew(held)
        assert not await first.complete(held, outcome())
        assert await first.retry_or_fail(held, "late") is None
        assert await second.renew(taken)
        assert await second.complete(taken, outcome())
    row = await conn.fetchrow("select * from postcall_jobs where id = $1", job_id)
    assert (row["status"], row["worker"], row["error"]) == ("done", "w1", None)
    assert await conn.fetchval("select transcript from postcall_results") == "text"


async def test_failed_attempts_back_off_then_fail_with_the_error_kept(
    conn: Any, fresh_db: str
) -> None:
    _, job_id = await insert_job(conn, "/x.wav")
    settings = Settings(database_url=fresh_db, max_retries=1, retry_backoff=30.0)
    async with queues(settings, 1) as (queue,):
        (job,) = await queue.claim(1)
        assert await queue.retry_or_fail(job, "first error") == "queued"
        assert await queue.claim(1) == []  # backing off
        waiting, next_in = await queue.waiting()
        assert waiting == 1 and next_in is not None and 28 < next_in <= 30
        await conn.execute("update postcall_jobs set run_after = now()")
        (job,) = await queue.claim(1)
        assert job.attempts == 2 and job.previous_error == "first error"
        assert queue.backoff(2) == 60.0
        assert await queue.retry_or_fail(job, "second error") == "failed"
        assert await queue.claim(1) == []
        assert await queue.waiting() == (0, None)
    row = await conn.fetchrow("select * from postcall_jobs where id = $1", job_id)
    assert (row["status"], row["attempts"], row["error"]) == ("failed", 2, "second error")


def worker_command(settings_env: dict[str, str], db: str, **extra: str) -> dict[str, Any]:
    env = {**os.environ, **settings_env, "DATABASE_URL": db, **extra}
    return {
        "args": [sys.executable, "-m", "streamsrv.cli", "worker", "--drain"],
        "env": env,
        "cwd": ROOT,
        "capture_output": True,
        "text": True,
        "timeout": 120,
    }


async def test_drain_exits_0_when_the_queue_is_empty(
    settings_env: dict[str, str], fresh_db: str
) -> None:
    done = await asyncio.to_thread(subprocess.run, **worker_command(settings_env, fresh_db))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line]
    assert "queue_drained" in events and "job_claimed" not in events


async def test_drain_retries_a_bad_recording_then_fails_it(
    settings_env: dict[str, str], conn: Any, fresh_db: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not a recording\n" * 100)
    call_id, job_id = await insert_job(conn, str(bad))
    settings = make_settings(settings_env, DATABASE_URL=fresh_db)
    async with lifecycle(settings) as messages:
        command = worker_command(
            settings_env,
            fresh_db,
            MAX_RETRIES="2",  # the alias of CELERY_MAX_RETRIES
            RETRY_BACKOFF="0",
            REDIS_CHANNEL_PREFIX=settings.redis_channel_prefix,
        )
        done = await asyncio.to_thread(subprocess.run, **command)
    assert done.returncode == 0, done.stderr
    row = await conn.fetchrow("select * from postcall_jobs where id = $1", job_id)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert "InvalidDataError" in row["error"] or "Invalid data" in row["error"], row["error"]
    assert await conn.fetchval("select count(*) from postcall_results") == 0
    (failed,) = [m for m in messages if m["type"] == "postcall_failed"]
    assert (failed["call_id"], failed["job_id"], failed["attempts"]) == (call_id, job_id, 3)
    assert failed["error"] == row["error"]


async def test_a_real_job_end_to_end_then_the_cache(
    settings_env: dict[str, str], conn: Any, fresh_db: str, model_dir: Path, tmp_path: Path
) -> None:
    pause = 2.0
    call = corpus.build_call(corpus.pick_prompts(4, 7), pause=pause)
    recording = tmp_path / "recordings" / "call.wav"
    recording.parent.mkdir(parents=True)
    recording.write_bytes(wav_bytes(call.pcm, corpus.RATE))
    call_id, job_id = await insert_job(
        conn, str(recording), dtmf="12#", role="caller", conversation="1764720000.42"
    )
    # A short lease: the job takes longer, so only renewals keep it from the second worker.
    settings = make_settings(
        settings_env, DATABASE_URL=fresh_db, JOB_LEASE_SECONDS="2", WORKER_POLL_INTERVAL="0.2"
    )
    model = shared_model(model_dir)
    async with lifecycle(settings) as messages:
        first = asyncio.create_task(drain(settings, model))
        for _ in range(1200):  # until the first worker holds the job
            if await conn.fetchval("select status from postcall_jobs") != "queued":
                break
            await asyncio.sleep(0.05)
        second = Worker(settings, model)
        await second.start()
        watching = asyncio.create_task(second.serve())
        await first
        second.stop()
        await watching
        await second.close()

    job = await conn.fetchrow("select * from postcall_jobs where id = $1", job_id)
    assert (job["status"], job["attempts"], job["error"]) == ("done", 1, None)
    result = await conn.fetchrow("select * from postcall_results where call_id = $1", call_id)
    assert wer(call.reference, result["transcript"]) < 0.15, result["transcript"]
    assert result["language"] == "en" and result["translation"] is None
    assert result["model"] == "base (cpu, int8)"
    segments = json.loads(result["segments"])
    words = [w for s in segments for w in s["words"]]
    assert len(words) >= len(call.reference.split()) * 0.8
    for w in words:
        assert set(w) == {"word", "start", "end", "probability"}
        assert 0 <= w["start"] <= w["end"] <= call.seconds + 0.1 and 0 <= w["probability"] <= 1
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert words[0]["start"] >= call.utterances[0].start - 0.5

    insights = json.loads(result["insights"])
    pcm = np.frombuffer(call.pcm, "<i2")
    spans = []  # each prompt without its own leading and trailing near-silence
    for u in call.utterances:
        loud = np.flatnonzero(np.abs(pcm[int(u.start * 8000) : int(u.end * 8000)]) > 300)
        spans.append((u.start + loud[0] / 8000, u.start + loud[-1] / 8000))
    voiced = sum(end - start for start, end in spans)
    assert abs(insights["speech_seconds"] - voiced) < max(0.6, 0.1 * voiced), insights
    assert insights["speech_seconds"] <= sum(u.end - u.start for u in call.utterances)
    widest = max(b[0] - a[1] for a, b in itertools.pairwise(spans))
    assert pause <= insights["longest_silence_seconds"] <= widest + 0.4, insights
    assert insights["duration_seconds"] == pytest.approx(call.seconds, abs=0.01)
    assert insights["silence_seconds"] == pytest.approx(
        call.seconds - insights["speech_seconds"], abs=0.01
    )
    assert insights["talk_ratio"] == pytest.approx(insights["speech_seconds"] / call.seconds, 1e-3)
    assert insights["speech_segments"] == len(call.utterances)
    assert insights["words"] == len(words)
    assert 100 < insights["speaking_rate_wpm"] < 260
    assert insights["dtmf"] == "12#"
    assert -30 < insights["rms_dbfs"] < insights["peak_dbfs"] <= 0
    assert insights["clipping_ratio"] == 0
    terms = insights["salient_terms"]
    assert terms and all(t["term"] in result["transcript"].lower() for t in terms)
    assert [t["count"] for t in terms] == sorted((t["count"] for t in terms), reverse=True)
    timings = json.loads(result["timings"])
    assert timings["cached"] is False and timings["transcribe"] > 0
    assert timings["audio_seconds"] == pytest.approx(call.seconds, abs=0.01)
    assert timings["real_time_factor"] == pytest.approx(
        timings["total"] / timings["audio_seconds"], abs=0.01
    )

    (done,) = [m for m in messages if m["type"] == "postcall_done"]
    assert (done["call_id"], done["job_id"], done["language"]) == (call_id, job_id, "en")
    assert done["model"] == "base (cpu, int8)" and done["cached"] is False
    assert (done["role"], done["conversation"]) == ("caller", "1764720000.42")  # its context
    assert abs(done["emitted_at"] - datetime.now(UTC).timestamp()) < 60

    # The same recording again, for another call: answered from the cache, not the model.
    copy = tmp_path / "recordings" / "copy.wav"
    shutil.copy(recording, copy)
    again_id, again_job = await insert_job(conn, str(copy), dtmf="9")
    runs = model.runs
    async with lifecycle(settings) as messages:
        await drain(settings, model)
    assert model.runs == runs
    again = await conn.fetchrow("select * from postcall_results where call_id = $1", again_id)
    assert again["transcript"] == result["transcript"]
    assert again["segments"] == result["segments"]
    assert json.loads(again["insights"])["dtmf"] == "9"  # the call's own, not the cached call's
    cached_timings = json.loads(again["timings"])
    assert cached_timings["cached"] is True and cached_timings["transcribe"] == 0
    assert [m["cached"] for m in messages if m["type"] == "postcall_done"] == [True]
    assert await conn.fetchval("select status from postcall_jobs where id = $1", again_job) == (
        "done"
    )


async def test_a_second_stop_gives_the_running_job_back(
    settings_env: dict[str, str], conn: Any, fresh_db: str, model_dir: Path, tmp_path: Path
) -> None:
    call = corpus.build_call(corpus.pick_prompts(4, 8), pause=1.0)
    recording = tmp_path / "call.wav"
    recording.write_bytes(wav_bytes(call.pcm, corpus.RATE))
    _, job_id = await insert_job(conn, str(recording))
    settings = make_settings(settings_env, DATABASE_URL=fresh_db)
    worker = Worker(settings, shared_model(model_dir))
    await worker.start()
    serving = asyncio.create_task(worker.serve())
    for _ in range(1200):
        if await conn.fetchval("select status from postcall_jobs") == "running":
            break
        await asyncio.sleep(0.05)
    worker.stop()  # the first: finish the running job ...
    await asyncio.sleep(0.2)
    assert not serving.done()
    worker.stop()  # ... the second: give it back now
    await asyncio.wait_for(serving, 5)
    await worker.close()
    for thread in abandoned_jobs():  # the model work given up on must not outlive the test
        await asyncio.to_thread(thread.join, 120)
    job = await conn.fetchrow("select * from postcall_jobs where id = $1", job_id)
    assert (job["status"], job["attempts"], job["lease_expires_at"]) == ("queued", 0, None)
    assert await conn.fetchval("select count(*) from postcall_results") == 0


def test_a_spanish_call_is_transcribed_in_spanish_and_translated(model_dir: Path) -> None:
    """The same Asterisk prompts recorded in Spanish: the language is detected, the transcript
    is Spanish, and with INCLUDE_TRANSLATION Whisper's translate task gives English, scored
    against the English texts of the same prompts."""
    spanish, english = corpus.texts("es"), corpus.texts("en")
    both = sorted(
        name for name in spanish if name in english and 5 <= len(english[name].split()) <= 20
    )
    names = random.Random(3).sample(both, 4)
    call = corpus.build_call(names, pause=1.0, language="es")
    settings = Settings(model_dir=model_dir, whisper_device="cpu", include_translation=True)
    out = PostcallModel(settings).process(wav_bytes(call.pcm, corpus.RATE), None)

    assert out.language == "es"
    assert wer(call.reference, out.transcript) < 0.35, out.transcript
    reference = " ".join(english[name] for name in names)
    assert out.translation is not None
    assert wer(reference, out.translation) < 0.8, out.translation
    assert wer(reference, out.translation) < wer(reference, out.transcript) - 0.3
