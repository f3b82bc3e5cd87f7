"""Typed repositories over the two tables a call has in Postgres: one explicit method per
query, and all the SQL of a table in one place.

CallRepository: the `calls` rows (at start, at end, of an upload) and the call view of
GET /calls/<id>. JobRepository: the `postcall_jobs` rows, from the job a call queues to the
worker's claim, lease, completion, retry and release.

The job queue. Any number of workers on any number of machines share one queue. A claim locks
the next rows with FOR UPDATE SKIP LOCKED, so concurrent claimers never wait for each other and
never get the same job, and marks them running with a lease (lease_expires_at) that the worker
renews while it works. A job whose worker died keeps status running until its lease expires;
then it is claimable again. Every claim counts an attempt, and (worker, attempts) fences the
claim: a worker that lost its lease can neither renew it nor write a result over the new
holder's. A failed attempt goes back to the queue after RETRY_BACKOFF * 2^(attempt - 1) seconds
(at most an hour); after CELERY_MAX_RETRIES retries the job is failed, its last error kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from streamsrv.config import Settings
from streamsrv.conversation import LegResult

if TYPE_CHECKING:
    from streamsrv.postcall.transcribe import Outcome


class PoolSource(Protocol):
    """Where the connection pool comes from (streamsrv.jobs.JobStore, once started)."""

    @property
    def pool(self) -> Any: ...


MAX_BACKOFF = 3600.0

_CLAIM = """
with next_jobs as (
    select id, status = 'running' as reclaimed from postcall_jobs
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
    j.created_at, (select dtmf from calls c where c.call_id = j.call_id) as dtmf,
    (select role from calls c where c.call_id = j.call_id) as role,
    (select conversation from calls c where c.call_id = j.call_id) as conversation,
    next_jobs.reclaimed
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
    role: str | None = None  # from the call's context
    conversation: str | None = None
    reclaimed: bool = False  # taken over from a worker whose lease had expired


# The queue at a glance (GET /queue, /health, the worker's gauges): one statement, each part
# served by an index (the claim index, and migration 5's on updated_at).
_OVERVIEW = """
with counts as (
    select status, count(*) as n from postcall_jobs group by status
), failed as (
    select id, call_id, error, updated_at from postcall_jobs
    where status = 'failed' order by updated_at desc limit $1
), workers as (
    select worker, max(updated_at) as last_seen,
        count(*) filter (where status = 'running' and lease_expires_at >= now()) as running
    from postcall_jobs
    where worker is not null and updated_at > now() - make_interval(secs => $2)
    group by worker
)
select
    (select coalesce(jsonb_object_agg(status, n), '{}') from counts) as counts,
    (select count(*) from postcall_jobs
     where status = 'done' and updated_at > now() - make_interval(secs => $2)) as done_recent,
    (select coalesce(jsonb_agg(jsonb_build_array(id, call_id, error, updated_at)
        order by updated_at desc, id desc), '[]') from failed) as failed,
    (select coalesce(jsonb_agg(jsonb_build_array(worker, last_seen, running)
        order by last_seen desc, worker), '[]') from workers) as workers
"""

RECENT_SECONDS = 3600.0  # "done in the last hour", "workers seen in the last hour"
FAILED_SHOWN = 20


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    call_id: str | None
    error: str
    failed_at: datetime


@dataclass(frozen=True)
class WorkerSeen:
    """A worker (its `worker` name) that claimed, renewed or finished a job lately."""

    worker: str
    last_seen: datetime
    running: int  # jobs it holds under a live lease


@dataclass(frozen=True)
class QueueOverview:
    """How many jobs wait, run and failed; what finished in the last hour; the latest
    failures; the workers seen lately."""

    queued: int
    running: int
    failed: int
    done_last_hour: int
    failed_recent: tuple[FailedJob, ...]
    workers: tuple[WorkerSeen, ...]

    def counts(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "running": self.running,
            "failed": self.failed,
            "done_last_hour": self.done_last_hour,
        }

    def to_json(self) -> dict[str, Any]:
        """The body of GET /queue."""
        return {
            **self.counts(),
            "failed_recent": [
                {
                    "job_id": str(f.job_id),
                    "call_id": f.call_id,
                    "error": f.error,
                    "failed_at": f.failed_at.isoformat(),
                }
                for f in self.failed_recent
            ],
            "workers": [
                {"worker": w.worker, "last_seen": w.last_seen.isoformat(), "running": w.running}
                for w in self.workers
            ],
        }


class CallRepository:
    """The `calls` table."""

    def __init__(self, db: PoolSource) -> None:
        self._db = db

    async def started(
        self,
        call_id: str,
        created_at: datetime,
        peer: str,
        sample_rate: int,
        processing_mode: str,
    ) -> None:
        """Insert the call as active; a repeat for the same call changes nothing."""
        await self._db.pool.execute(
            "insert into calls (call_id, created_at, peer, sample_rate, status, processing_mode)"
            " values ($1, $2, $3, $4, 'active', $5) on conflict (call_id) do nothing",
            call_id,
            created_at,
            peer,
            sample_rate,
            processing_mode,
        )

    async def conversation(self, conversation: str) -> list[dict[str, Any]]:
        """The calls that are legs of a conversation, oldest first, as JSON values."""
        rows = await self._db.pool.fetch(
            "select to_jsonb(c) - 'live_transcript' as call, c.live_transcript"
            " from calls c where conversation = $1 order by created_at, call_id",
            conversation,
        )
        return [{**json.loads(r["call"]), "live_transcript": r["live_transcript"]} for r in rows]

    async def conversation_results(self, conversation: str) -> list[LegResult] | None:
        """Every leg's post-call result, once each leg's job is done; None before that."""
        rows = await self._db.pool.fetch(
            "select c.call_id, c.role, c.created_at, j.status, r.segments"
            " from calls c left join postcall_jobs j using (call_id)"
            " left join postcall_results r using (call_id)"
            " where c.conversation = $1 order by c.created_at, c.call_id",
            conversation,
        )
        if not rows or any(r["status"] != "done" or r["segments"] is None for r in rows):
            return None
        return [
            LegResult(
                str(r["call_id"]), r["role"], r["created_at"].timestamp(), json.loads(r["segments"])
            )
            for r in rows
        ]

    async def store_conversation(
        self, conversation: str, transcript: str, turns: list[dict[str, Any]], legs: int
    ) -> None:
        await self._db.pool.execute(
            "insert into conversation_results (conversation, transcript, turns, legs)"
            " values ($1, $2, $3::jsonb, $4) on conflict (conversation) do update set"
            " transcript = excluded.transcript, turns = excluded.turns, legs = excluded.legs,"
            " created_at = now()",
            conversation,
            transcript,
            json.dumps(turns),
            legs,
        )

    async def conversation_result(self, conversation: str) -> dict[str, Any] | None:
        row = await self._db.pool.fetchrow(
            "select to_jsonb(r) - 'conversation' as result from conversation_results r"
            " where conversation = $1",
            conversation,
        )
        return json.loads(row["result"]) if row is not None else None

    async def set_context(
        self, call_id: str, context: dict[str, Any], language: str | None
    ) -> None:
        """The call's context (the fields given replace theirs; tags are added to its tags);
        the language too when the context fixes one."""
        await self._db.pool.execute(
            "update calls set role = coalesce($2, role), conversation = coalesce($3,"
            " conversation), caller = coalesce($4, caller), agent = coalesce($5, agent),"
            " queue = coalesce($6, queue), tags = coalesce(tags, '{}'::jsonb) || $7::jsonb,"
            " language = coalesce($8, language) where call_id = $1",
            call_id,
            context.get("role"),
            context.get("conversation"),
            context.get("caller"),
            context.get("agent"),
            context.get("queue"),
            json.dumps(context.get("tags", {})),
            language,
        )

    async def finished(
        self,
        call_id: str,
        ended_at: datetime,
        duration_s: float,
        dtmf: str,
        live_transcript: str,
        language: str | None,
        status: str,
        audio_path: str | None,
        job_language: str | None,
    ) -> int | None:
        """Record the end of a call (creating its row if call_started never reached Postgres)
        and, with an `audio_path`, queue its post-call job once, as JobRepository.enqueue
        does, in one statement: the job's id (the existing one on a repeat), None without."""
        job_id = await self._db.pool.fetchval(
            "with ended as ("
            " insert into calls (call_id, created_at, ended_at, duration_s, dtmf,"
            " live_transcript, language, status)"
            " values ($1, $2::timestamptz - make_interval(secs => $3::float8),"
            " $2, $3, $4, $5, $6, $7)"
            " on conflict (call_id) do update set ended_at = excluded.ended_at,"
            " duration_s = excluded.duration_s, dtmf = excluded.dtmf,"
            " live_transcript = excluded.live_transcript, language = excluded.language,"
            " status = excluded.status returning call_id),"
            " job as (insert into postcall_jobs (call_id, audio_path, priority, language)"
            " select call_id, $8, 0, $9 from ended where $8::text is not null"
            " on conflict (call_id) do nothing returning id)"
            " select coalesce((select id from job),"
            " (select id from postcall_jobs where call_id = $1 and $8::text is not null))",
            call_id,
            ended_at,
            duration_s,
            dtmf,
            live_transcript,
            language,
            status,
            audio_path,
            job_language,
        )
        return None if job_id is None else int(job_id)

    async def create_upload(
        self,
        call_id: str,
        received_at: datetime,
        duration_s: float,
        audio_path: str,
        priority: int,
        language: str | None,
    ) -> int:
        """An uploaded recording: an ended postcall_only call and its job, both or neither."""
        async with self._db.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "insert into calls (call_id, created_at, ended_at, duration_s, peer,"
                " sample_rate, status, processing_mode)"
                " values ($1, $2, $2, $3, 'upload', 16000, 'ended', 'postcall_only')",
                call_id,
                received_at,
                duration_s,
            )
            job_id = await conn.fetchval(
                "insert into postcall_jobs (call_id, audio_path, priority, language)"
                " values ($1, $2, $3, $4) returning id",
                call_id,
                audio_path,
                priority,
                language,
            )
        return int(job_id)

    async def view(self, call_id: str) -> dict[str, Any] | None:
        """The call row with its job and post-call results (null until there are any), as JSON
        values; None for an unknown call."""
        row = await self._db.pool.fetchrow(
            "select to_jsonb(c) as call, to_jsonb(j) - 'call_id' as job,"
            " to_jsonb(r) - 'call_id' as results"
            " from calls c left join postcall_jobs j using (call_id)"
            " left join postcall_results r using (call_id) where c.call_id = $1",
            call_id,
        )
        if row is None:
            return None
        view: dict[str, Any] = json.loads(row["call"])
        view["job"] = json.loads(row["job"]) if row["job"] is not None else None
        view["results"] = json.loads(row["results"]) if row["results"] is not None else None
        return view


class JobRepository:
    """The `postcall_jobs` table: a call's job, and (for a worker: `worker` names it) the
    claim, lease, completion, retry and release of jobs."""

    def __init__(self, db: PoolSource, settings: Settings, worker: str = "") -> None:
        self._db = db
        self._settings = settings
        self.worker = worker
        order = (
            "priority desc, created_at, id" if settings.queue_priority_enabled else "created_at, id"
        )
        self._claim_sql = _CLAIM.format(order=order)

    async def enqueue(
        self, call_id: str, audio_path: str, priority: int = 0, language: str | None = None
    ) -> int:
        """Queue the call's post-call job once; returns its id, the existing one on a repeat.
        `language`: the one the call's context fixed (None: LANGUAGE, then detection)."""
        pool = self._db.pool
        job_id = await pool.fetchval(
            "insert into postcall_jobs (call_id, audio_path, priority, language)"
            " values ($1, $2, $3, $4) on conflict (call_id) do nothing returning id",
            call_id,
            audio_path,
            priority,
            language,
        )
        if job_id is None:
            job_id = await pool.fetchval("select id from postcall_jobs where call_id = $1", call_id)
        return int(job_id)

    async def claim(self, limit: int) -> list[Job]:
        """Up to `limit` jobs, best first; marks them running under a fresh lease."""
        rows = await self._db.pool.fetch(
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
                role=r["role"],
                conversation=r["conversation"],
                previous_error=r["error"],
                reclaimed=r["reclaimed"],
            )
            for r in rows
        ]

    async def renew(self, job: Job) -> bool:
        """Extend the lease; False when this worker no longer holds the job."""
        held = await self._db.pool.fetchval(
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
        async with self._db.pool.acquire() as conn, conn.transaction():
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
        result: str | None = await self._db.pool.fetchval(
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
        await self._db.pool.execute(
            "update postcall_jobs set status = 'queued', attempts = attempts - 1,"
            f" lease_expires_at = null, run_after = now(), updated_at = now() where {_HELD}",
            job.id,
            self.worker,
            job.attempts,
        )

    async def waiting(self) -> tuple[int, float | None]:
        """Jobs a worker could still take (queued, or running under an expired lease), and the
        seconds until the next of them may be claimed (0 when one may be now)."""
        row = await self._db.pool.fetchrow(
            "select count(*) as n, extract(epoch from min("
            "  case when status = 'queued' then run_after else now() end) - now()) as wait"
            " from postcall_jobs"
            " where status = 'queued' or (status = 'running' and lease_expires_at < now())"
        )
        wait = row["wait"]
        return int(row["n"]), max(0.0, float(wait)) if wait is not None else None

    async def overview(self) -> QueueOverview:
        """The queue at a glance, in one statement (see _OVERVIEW)."""
        row = await self._db.pool.fetchrow(_OVERVIEW, FAILED_SHOWN, RECENT_SECONDS)
        counts: dict[str, int] = json.loads(row["counts"])
        return QueueOverview(
            queued=counts.get("queued", 0),
            running=counts.get("running", 0),
            failed=counts.get("failed", 0),
            done_last_hour=int(row["done_recent"]),
            failed_recent=tuple(
                FailedJob(int(i), c, e or "", datetime.fromisoformat(at))
                for i, c, e, at in json.loads(row["failed"])
            ),
            workers=tuple(
                WorkerSeen(w, datetime.fromisoformat(seen), int(n))
                for w, seen, n in json.loads(row["workers"])
            ),
        )
