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
        await db.calls.ended(
            self.call_id,
            self.ended_at,
            self.duration_s,
            self.dtmf,
            self.live_transcript,
            self.language,
            self.status,
        )


Write = CallStartedRow | JobRow | ContextRow | CallEndedRow
_KINDS: dict[str, type[Write]] = {
    kind.OP: kind for kind in (CallStartedRow, JobRow, ContextRow, CallEndedRow)
}


def to_spool(write: Write) -> dict[str, Any]:
    kwargs = {f.name: _plain(getattr(write, f.name)) for f in dataclasses.fields(write)}
    return {"op": write.OP, "kwargs": kwargs}


def from_spool(data: dict[str, Any]) -> Write:
    """A spooled write; raises KeyError or TypeError for a file this version cannot read."""
    kind = _KINDS[data["op"]]
    kwargs: dict[str, Any] = {
        k: datetime.fromisoformat(v) if k.endswith("_at") and isinstance(v, str) else v
        for k, v in data["kwargs"].items()
    }
    return kind(**kwargs)


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
