"""The post-call job queue in Postgres: claim, lease, finish, retry or fail.

Any number of workers on any number of machines share one queue. A claim locks the next rows
with FOR UPDATE SKIP LOCKED, so concurrent claimers never wait for each other and never get the
same job, and marks them running with a lease (lease_expires_at) that the worker renews while it
works. A job whose worker died keeps status running until its lease expires; then it is claimable
again. Every claim counts an attempt, and (worker, attempts) fences the claim: a worker that lost
its lease can neither renew it nor write a result over the new holder's.

A failed attempt goes back to the queue after RETRY_BACKOFF * 2^(attempt - 1) seconds (at most an
hour); after CELERY_MAX_RETRIES retries the job is failed, its last error kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from streamsrv.config import Settings
from streamsrv.postcall.transcribe import Outcome

MAX_BACKOFF = 3600.0

_CLAIM = """
with next_jobs as (
    select id from postcall_jobs
    where (status = 'queued' and run_after <= now())
       or (status = 'running' and lease_expires_at < now())
    order by {order}
    limit $1
    for update skip locked
)
update postcall_jobs j
set status = 'running', attempts = j.attempts + 1, worker = $2, updated_at = now(),
    lease_expires_at = now() + make_interval(secs => $3)
from next_jobs
where j.id = next_jobs.id
returning j.id, j.call_id, j.audio_path, j.priority, j.attempts, j.language, j.error,
    j.created_at, (select dtmf from calls c where c.call_id = j.call_id) as dtmf
"""

_HELD = "id = $1 and worker = $2 and attempts = $3 and status = 'running'"


@dataclass(frozen=True)
class Job:
    id: int
    call_id: str
    audio_path: str
    priority: int
    attempts: int  # including this one
    language: str | None
    dtmf: str
    previous_error: str | None


class JobQueue:
    """One worker's view of the queue: what it claims carries its name."""

    def __init__(self, pool: Any, settings: Settings, worker: str) -> None:
        self._pool = pool
        self._settings = settings
        self.worker = worker
        order = (
            "priority desc, created_at, id" if settings.queue_priority_enabled else "created_at, id"
        )
        self._claim_sql = _CLAIM.format(order=order)

    async def claim(self, limit: int) -> list[Job]:
        """Up to `limit` jobs, best first; marks them running under a fresh lease."""
        rows = await self._pool.fetch(
            self._claim_sql, limit, self.worker, self._settings.job_lease_seconds
        )
        if self._settings.queue_priority_enabled:
            rows.sort(key=lambda r: (-r["priority"], r["created_at"], r["id"]))
        else:  # UPDATE ... RETURNING does not keep the claim's order
            rows.sort(key=lambda r: (r["created_at"], r["id"]))
        return [
            Job(
                id=r["id"],
                call_id=str(r["call_id"]),
                audio_path=r["audio_path"],
                priority=r["priority"],
                attempts=r["attempts"],
                language=r["language"],
                dtmf=r["dtmf"] or "",
                previous_error=r["error"],
            )
            for r in rows
        ]

    async def renew(self, job: Job) -> bool:
        """Extend the lease; False when this worker no longer holds the job."""
        held = await self._pool.fetchval(
            "update postcall_jobs set lease_expires_at = now() + make_interval(secs => $4),"
            f" updated_at = now() where {_HELD} returning id",
            job.id,
            self.worker,
            job.attempts,
            self._settings.job_lease_seconds,
        )
        return held is not None

    async def complete(self, job: Job, outcome: Outcome) -> bool:
        """Store the results and mark the job done, in one transaction; False (and nothing
        written) when the lease was lost meanwhile."""
        async with self._pool.acquire() as conn, conn.transaction():
            held = await conn.fetchval(
                f"select id from postcall_jobs where {_HELD} for update",
                job.id,
                self.worker,
                job.attempts,
            )
            if held is None:
                return False
            await conn.execute(
                "insert into postcall_results (call_id, transcript, segments, language,"
                " translation, insights, model, timings)"
                " values ($1, $2, $3::jsonb, $4, $5, $6::jsonb, $7, $8::jsonb)"
                " on conflict (call_id) do update set transcript = excluded.transcript,"
                " segments = excluded.segments, language = excluded.language,"
                " translation = excluded.translation, insights = excluded.insights,"
                " model = excluded.model, timings = excluded.timings, created_at = now()",
                job.call_id,
                outcome.transcript,
                json.dumps(outcome.segments),
                outcome.language,
                outcome.translation,
                json.dumps(outcome.insights) if outcome.insights is not None else None,
                outcome.model,
                json.dumps(outcome.timings),
            )
            await conn.execute(
                "update postcall_jobs set status = 'done', error = null,"
                " lease_expires_at = null, updated_at = now() where id = $1",
                job.id,
            )
        return True

    def backoff(self, attempts: int) -> float:
        """Seconds before the retry that follows attempt number `attempts`."""
        return float(min(MAX_BACKOFF, self._settings.retry_backoff * 2 ** (attempts - 1)))

    async def retry_or_fail(self, job: Job, error: str) -> str | None:
        """After a failed attempt: "queued" (retried after the back-off) or "failed" (no retries
        left); None when the lease was lost meanwhile (the new holder decides)."""
        status = "failed" if job.attempts > self._settings.max_retries else "queued"
        result: str | None = await self._pool.fetchval(
            "update postcall_jobs set status = $4, error = $5, lease_expires_at = null,"
            " run_after = now() + make_interval(secs => $6), updated_at = now()"
            f" where {_HELD} returning status",
            job.id,
            self.worker,
            job.attempts,
            status,
            error,
            self.backoff(job.attempts),
        )
        return result

    async def release(self, job: Job) -> None:
        """Give a job back untried (the worker is stopping): queued now, the attempt uncounted."""
        await self._pool.execute(
            "update postcall_jobs set status = 'queued', attempts = attempts - 1,"
            f" lease_expires_at = null, run_after = now(), updated_at = now() where {_HELD}",
            job.id,
            self.worker,
            job.attempts,
        )

    async def waiting(self) -> tuple[int, float | None]:
        """Jobs a worker could still take (queued, or running under an expired lease), and the
        seconds until the next of them may be claimed (0 when one may be now)."""
        row = await self._pool.fetchrow(
            "select count(*) as n, extract(epoch from min("
            "  case when status = 'queued' then run_after else now() end) - now()) as wait"
            " from postcall_jobs"
            " where status = 'queued' or (status = 'running' and lease_expires_at < now())"
        )
        wait = row["wait"]
        return int(row["n"]), max(0.0, float(wait)) if wait is not None else None
