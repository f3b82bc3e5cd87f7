"""The writes a call makes to Postgres, as typed records: its row at start, its post-call job,
its row at end. Each is applied by one explicit repository method, and each has a stable
spool form (`{"op": ..., "kwargs": ...}`) so that a write made while Postgres was away is
replayed later, by this version or the next. Every write is idempotent."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from streamsrv.jobs import JobStore


@dataclass(frozen=True, slots=True)
class CallStartedRow:
    OP: ClassVar[str] = "call_started"

    call_id: str
    created_at: datetime
    peer: str
    sample_rate: int
    processing_mode: str

    async def apply(self, db: JobStore) -> None:
        await db.calls.started(
            self.call_id, self.created_at, self.peer, self.sample_rate, self.processing_mode
        )


@dataclass(frozen=True, slots=True)
class JobRow:
    OP: ClassVar[str] = "enqueue_job"

    call_id: str
    audio_path: str
    language: str | None = None  # fixed by the call's context

    async def apply(self, db: JobStore) -> int:
        return await db.jobs.enqueue(self.call_id, self.audio_path, language=self.language)


@dataclass(frozen=True, slots=True)
class ContextRow:
    OP: ClassVar[str] = "call_context"

    call_id: str
    context: dict[str, Any]  # CallContext.as_json()
    language: str | None  # fixed by it, if it fixes one

    async def apply(self, db: JobStore) -> None:
        await db.calls.set_context(self.call_id, self.context, self.language)


@dataclass(frozen=True, slots=True)
class CallEndedRow:
    OP: ClassVar[str] = "call_ended"

    call_id: str
    ended_at: datetime
    duration_s: float
    dtmf: str
    live_transcript: str
    language: str | None
    status: str

    async def apply(self, db: JobStore) -> None:
        await CallFinishedRow(self, None).apply(db)  # spooled by a version before jobs joined


@dataclass(frozen=True, slots=True)
class CallFinishedRow:
    """A call's end row and its post-call job (when its mode asks for one) as one statement:
    one round trip and one pooled connection at a call's end instead of two."""

    OP: ClassVar[str] = "call_finished"

    ended: CallEndedRow
    job: JobRow | None

    async def apply(self, db: JobStore) -> int | None:
        e, job = self.ended, self.job
        return await db.calls.finished(
            e.call_id,
            e.ended_at,
            e.duration_s,
            e.dtmf,
            e.live_transcript,
            e.language,
            e.status,
            job.audio_path if job is not None else None,
            job.language if job is not None else None,
        )


Write = CallStartedRow | JobRow | ContextRow | CallEndedRow | CallFinishedRow
_KINDS: dict[str, type[Write]] = {
    kind.OP: kind for kind in (CallStartedRow, JobRow, ContextRow, CallEndedRow, CallFinishedRow)
}


def to_spool(write: Write) -> dict[str, Any]:
    return {"op": write.OP, "kwargs": _plain(write)}


def from_spool(data: dict[str, Any]) -> Write:
    """A spooled write; raises KeyError or TypeError for a file this version cannot read."""
    kind = _KINDS[data["op"]]
    kwargs = data["kwargs"]
    if kind is CallFinishedRow:
        job = kwargs["job"]
        return CallFinishedRow(
            _record(CallEndedRow, kwargs["ended"]), None if job is None else _record(JobRow, job)
        )
    record: Write = _record(kind, kwargs)
    return record


def _record(kind: type[Any], kwargs: dict[str, Any]) -> Any:
    return kind(
        **{
            k: datetime.fromisoformat(v) if k.endswith("_at") and isinstance(v, str) else v
            for k, v in kwargs.items()
        }
    )


def _plain(value: Any) -> Any:
    """JSON values of a record (a nested record too), times as ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
