"""Helpers for the post-call tests: a fresh database per test, recordings from the corpus, jobs
inserted as the server writes them, a worker run to the end, the lifecycle channel collected."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis.asyncio as redis

from streamsrv.config import Settings
from streamsrv.postcall.transcribe import PostcallModel
from streamsrv.postcall.worker import Worker
from tests.conftest import temporary_database


@pytest.fixture
def fresh_db(postgres_admin_url: str) -> Iterator[str]:
    """A database of this test's own: the session's has other tests' jobs in its queue."""
    with temporary_database(postgres_admin_url) as url:
        yield url


@functools.cache
def shared_model(model_dir: Path) -> PostcallModel:
    """One post-call model (base, int8, cpu) for every test of the session: loading is slow."""
    return PostcallModel(Settings(model_dir=model_dir, whisper_device="cpu"))


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def flac_bytes(pcm: bytes, rate: int) -> bytes:
    """The same 16-bit mono audio, FLAC-encoded with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as out:
        stream: Any = out.add_stream("flac", rate=rate, layout="mono")
        stream.format = "s16"
        samples = np.frombuffer(pcm, "<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


async def insert_job(
    conn: Any,
    audio_path: str,
    *,
    priority: int = 0,
    created_at: datetime | None = None,
    dtmf: str = "",
    sample_rate: int = 8000,
    role: str | None = None,
    conversation: str | None = None,
) -> tuple[str, int]:
    """An ended call and its queued job, as the server writes them; (call_id, job_id)."""
    call_id = str(uuid.uuid4())
    when = created_at or datetime.now(UTC)
    await conn.execute(
        "insert into calls (call_id, created_at, ended_at, peer, sample_rate, dtmf, status,"
        " processing_mode, role, conversation)"
        " values ($1, $2, $2, 'test', $3, $4, 'ended', 'hybrid', $5, $6)",
        call_id,
        when,
        sample_rate,
        dtmf,
        role,
        conversation,
    )
    job_id = await conn.fetchval(
        "insert into postcall_jobs (call_id, audio_path, priority, created_at)"
        " values ($1, $2, $3, $4) returning id",
        call_id,
        audio_path,
        priority,
        when,
    )
    return call_id, int(job_id)


async def drain(settings: Settings, model: PostcallModel | None = None) -> Worker:
    """Run a worker until the queue is empty, as `streamsrv worker --drain` does."""
    worker = Worker(settings, model)
    await worker.start()
    try:
        await asyncio.wait_for(worker.serve(drain=True), 300)
    finally:
        await worker.close()
    return worker


@contextlib.asynccontextmanager
async def lifecycle(settings: Settings) -> AsyncIterator[list[dict[str, Any]]]:
    """Messages on <prefix>calls while the block runs (and a moment after)."""
    client = redis.Redis.from_url(settings.redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{settings.redis_channel_prefix}calls")
    messages: list[dict[str, Any]] = []

    async def collect() -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                messages.append(json.loads(message["data"]))

    task = asyncio.create_task(collect())
    try:
        yield messages
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await client.aclose()
