"""Closing out calls that a crash left open.

A call is in the spool's journal from its start until its row and job are written. When the
server starts and finds journal entries, the process before it died mid-call: each such call is
closed out as interrupted. Its recording is made a valid WAV of everything that reached the disk,
its row and its post-call job are written (or spooled), and its call_ended message goes out with
reason "interrupted", numbered after the last message its stream kept.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from streamsrv import events
from streamsrv.config import Settings
from streamsrv.journal import Journal
from streamsrv.publish import Publisher
from streamsrv.recordings import repair_wav
from streamsrv.records import CallEndedRow, CallFinishedRow, CallStartedRow, JobRow
from streamsrv.spool import CallStore

log = structlog.get_logger(__name__)


async def _stream_state(settings: Settings, prefix: str, call_id: str) -> tuple[int, str]:
    """(last seq, transcript of finals) from the call's Redis stream; (0, "") if unreadable."""
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2)
    try:
        entries = await client.xrange(events.Channels(prefix).stream(call_id))
    except Exception as exc:  # Redis away: the call is still closed out, without its history
        log.warning("recovery_stream_unreadable", call_id=call_id, error=repr(exc))
        return 0, ""
    finally:
        await client.aclose()
    messages = [json.loads(fields[b"data"]) for _, fields in entries or [] if fields]
    last_seq = max((int(m.get("seq", 0)) for m in messages), default=0)
    text = " ".join(m["text"] for m in messages if m.get("type") == "final" and m.get("text"))
    return last_seq, text


async def recover_open_calls(
    journal: Journal, store: CallStore, publisher: Publisher, settings: Settings
) -> int:
    entries = await asyncio.to_thread(journal.entries)
    for info in entries:
        await _recover(info, journal, store, publisher, settings)
    return len(entries)


async def _recover(
    info: dict[str, Any],
    journal: Journal,
    store: CallStore,
    publisher: Publisher,
    settings: Settings,
) -> None:
    call_id, mode = info["call_id"], info["processing_mode"]
    path = Path(info["recording"])
    rate = int(info["sample_rate"])
    audio_bytes = await asyncio.to_thread(repair_wav, path, rate)
    created_at = datetime.fromisoformat(info["created_at"])
    ended_at = (
        datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
        if audio_bytes is not None
        else datetime.now(UTC)
    )
    duration = max(0.0, (ended_at - created_at).total_seconds())
    prefix = info.get("channel_prefix", settings.redis_channel_prefix)
    last_seq, transcript = await _stream_state(settings, prefix, call_id)
    await store.call_started(CallStartedRow(call_id, created_at, info["peer"], rate, mode))
    has_job = mode != "realtime_only" and audio_bytes is not None
    job = JobRow(call_id, str(path)) if has_job else None
    ended = CallEndedRow(call_id, ended_at, duration, "", transcript, None, "interrupted")
    job_id = await store.call_finished(CallFinishedRow(ended, job))
    audio_seconds = round((audio_bytes or 0) / 2 / rate, 3)
    publisher.emit(_ended_event(ended, audio_seconds, job_id, mode), last_seq + 1)
    await journal.closed(call_id)
    log.warning(
        "call_recovered",
        call_id=call_id,
        audio_seconds=audio_seconds,
        job_id=job_id,
        recording=str(path) if audio_bytes is not None else None,
    )


def _ended_event(
    row: CallEndedRow, audio_seconds: float, job_id: int | None, mode: str
) -> events.CallEnded:
    """The call_ended of a call closed out after a crash: how many segments it had is not
    known (its stream may have been cut short), so `segments` is null."""
    return events.CallEnded(
        call_id=row.call_id,
        ended_at=row.ended_at.timestamp(),
        duration=round(row.duration_s, 3),
        audio_seconds=audio_seconds,
        reason="interrupted",
        segments=None,
        job_id=job_id,
        processing_mode=mode,
    )
