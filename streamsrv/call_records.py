"""What a call leaves on disk and in Postgres, besides its recording: the journal entry that
lets a crash be recovered, its row at start, its post-call job and its row at end, in that
order. Writes go through CallStore, so a Postgres outage spools them instead of losing them."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streamsrv.context import CallContext
from streamsrv.journal import Journal
from streamsrv.recordings import Recording
from streamsrv.records import CallEndedRow, CallFinishedRow, CallStartedRow, ContextRow, JobRow
from streamsrv.spool import CallStore


@dataclass(frozen=True, slots=True)
class CallOpened:
    call_id: str
    created_at: datetime
    peer: str
    sample_rate: int
    processing_mode: str
    channel_prefix: str


class CallRecords:
    """One call's records; start() once its recording exists, finish() once it is complete."""

    def __init__(self, store: CallStore, journal: Journal) -> None:
        self._store = store
        self._journal = journal
        self._last: asyncio.Task[None] | None = (
            None  # the latest write; each waits for the one before
        )

    def start(self, opened: CallOpened, recording: Recording) -> None:
        """Journal the open call (so a crash cannot lose it), then write its row; in the
        background, so the loop does not wait on the disk or Postgres."""
        self._then(self._start(opened, recording))

    def context(self, call_id: str, context: CallContext, language: str | None) -> None:
        """Store the call's context (all of it so far), after the writes before it."""
        self._then(self._store.call_context(ContextRow(call_id, context.as_json(), language)))

    def _then(self, write: Coroutine[Any, Any, None]) -> None:
        before = self._last

        async def in_order() -> None:
            if before is not None:
                await before
            await write

        self._last = asyncio.get_running_loop().create_task(in_order())

    async def _start(self, c: CallOpened, recording: Recording) -> None:
        await recording.flush()  # the file exists, under the name it really got
        info = {
            "created_at": c.created_at.isoformat(),
            "peer": c.peer,
            "sample_rate": c.sample_rate,
            "processing_mode": c.processing_mode,
            "recording": str(recording.path),
            "channel_prefix": c.channel_prefix,
        }
        await self._journal.opened(c.call_id, info)
        await self._store.call_started(
            CallStartedRow(c.call_id, c.created_at, c.peer, c.sample_rate, c.processing_mode)
        )

    async def finish(self, ended: CallEndedRow, job: JobRow | None) -> int | None:
        """The job (if the call's mode asks for one) and the final row, then the journal entry
        struck out; the job's id, None when it waits in the spool or none was asked for.
        Raises when a write could neither be made nor spooled: the journal keeps the call."""
        if self._last is not None:
            await self._last
        job_id = await self._store.call_finished(CallFinishedRow(ended, job))
        await self._journal.closed(ended.call_id)
        return job_id
