"""Postgres: the schema and its migrations, the connection pool, and the repositories.

Migrations are numbered SQL steps recorded in schema_version and applied in one transaction under
an advisory lock, so any number of processes may run them at once and re-running is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import structlog

from streamsrv.config import Settings
from streamsrv.repositories import CallRepository, JobRepository

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Arbitrary fixed key ("streamsr" in ASCII) that serialises schema migrations across processes.
MIGRATION_LOCK_KEY = 0x73747265616D7372

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        create table calls (
            call_id uuid primary key,
            created_at timestamptz not null,
            ended_at timestamptz,
            duration_s double precision,
            peer text,
            sample_rate int,
            dtmf text not null default '',
            live_transcript text not null default '',
            language text,
            status text not null check (status in ('active', 'ended', 'interrupted')),
            processing_mode text
        );
        create index calls_created_at_idx on calls (created_at);
        create table postcall_jobs (
            id bigserial primary key,
            call_id uuid unique not null references calls (call_id),
            status text not null default 'queued'
                check (status in ('queued', 'running', 'done', 'failed')),
            priority int not null default 0,
            attempts int not null default 0,
            created_at timestamptz not null default now(),
            updated_at timestamptz not null default now(),
            audio_path text not null,
            error text
        );
        create index postcall_jobs_claim_idx
            on postcall_jobs (status, priority desc, created_at);
        """,
    ),
    (
        # The post-call worker: leases (a job whose worker died is taken again once its lease
        # expires), retry back-off, the requested language of uploads, and the results.
        2,
        """
        alter table postcall_jobs
            add column lease_expires_at timestamptz,
            add column run_after timestamptz not null default now(),
            add column worker text,
            add column language text;
        create index postcall_jobs_lease_idx
            on postcall_jobs (lease_expires_at) where status = 'running';
        create table postcall_results (
            call_id uuid primary key references calls (call_id),
            transcript text not null,
            segments jsonb not null,
            language text,
            translation text,
            insights jsonb,
            model text not null,
            timings jsonb not null,
            created_at timestamptz not null default now()
        );
        """,
    ),
    (
        # Call context from the PBX (POST /calls/<id>/context): who the stream is, which
        # conversation it belongs to; the index finds a conversation's legs.
        3,
        """
        alter table calls
            add column role text,
            add column conversation text,
            add column caller text,
            add column agent text,
            add column queue text,
            add column tags jsonb;
        create index calls_conversation_idx on calls (conversation)
            where conversation is not null;
        """,
    ),
    (
        # The post-call pass's transcript of a whole conversation, its legs merged by word
        # times, written once every leg's job is done.
        4,
        """
        create table conversation_results (
            conversation text primary key,
            transcript text not null,
            turns jsonb not null,
            legs int not null,
            created_at timestamptz not null default now()
        );
        """,
    ),
    (
        # The queue at a glance (GET /queue): what finished or failed lately, which workers
        # were seen lately, without reading the whole table.
        5,
        """
        create index postcall_jobs_updated_idx on postcall_jobs (updated_at);
        create index postcall_jobs_failed_idx on postcall_jobs (updated_at)
            where status = 'failed';
        """,
    ),
)


async def migrate(conn: asyncpg.Connection) -> None:
    """Bring the schema to the latest version; safe to run repeatedly and concurrently."""
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "create table if not exists schema_version ("
            " version int primary key,"
            " applied_at timestamptz not null default now())"
        )
        current = await conn.fetchval("select coalesce(max(version), 0) from schema_version")
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute("insert into schema_version (version) values ($1)", version)
            log.info("schema_migrated", version=version)


async def run_migrations(database_url: str) -> None:
    """`streamsrv migrate`: one connection, migrate, close."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def bounded(aw: Awaitable[T], seconds: float) -> T:
    """aw's result, or TimeoutError after `seconds` without waiting for aw to wind down: a
    query on a connection that hangs takes its own time to cancel (asyncpg asks Postgres to)."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.wait_for(asyncio.shield(task), seconds)
    except BaseException:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


def tcp_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a postgresql:// URL with one TCP host; None for anything else."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if not parts.hostname or "host" in query or "port" in query or "," in parts.netloc:
        return None
    try:
        port = parts.port or 5432
    except ValueError:
        return None
    return (parts.hostname, port)


class JobStore:
    """streamsrv's Postgres: the connection pool, the schema, and the repositories of its
    tables (`calls`, `jobs`: streamsrv.repositories)."""

    def __init__(
        self,
        settings: Settings,
        *,
        command_timeout: float = 10.0,
        check_timeout: float = 1.0,
        close_timeout: float = 10.0,
    ) -> None:
        self._url = settings.database_url
        self._command_timeout = command_timeout
        self._check_timeout = check_timeout
        self._close_timeout = close_timeout
        self._pool: Any = None
        self.calls = CallRepository(self)
        self.jobs = JobRepository(self, settings)

    async def start(self) -> None:
        """Open the pool and migrate; raises if Postgres cannot be reached."""
        pool = await asyncpg.create_pool(
            self._url, min_size=1, max_size=4, command_timeout=self._command_timeout
        )
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Close the pool; connections still busy after close_timeout are terminated."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._close_timeout)
        except TimeoutError:
            log.warning("postgres_close_timeout", timeout=self._close_timeout)
            pool.terminate()

    @property
    def started(self) -> bool:
        return self._pool is not None

    async def reachable(self, within: float) -> bool:
        """Whether Postgres's address accepts a TCP connection: the cheap probe while it is
        away. True when the address is not a plain host and port (a Unix socket directory,
        several hosts): then only a real connection attempt can tell."""
        address = tcp_address(self._url)
        if address is None:
            return True
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*address), within)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def check_or_raise(self) -> None:
        """A cheap round trip that raises when Postgres does not answer."""
        await asyncio.wait_for(self._require().fetchval("select 1"), self._check_timeout)

    @property
    def pool(self) -> Any:
        """The asyncpg pool, for the post-call queue and the HTTP API (after start())."""
        return self._require()

    async def check(self) -> str:
        """ "ok" or "down", cheaply, for /health."""
        if self._pool is None:
            return "down"
        try:
            await bounded(self._pool.fetchval("select 1"), self._check_timeout)
        except Exception as exc:  # any failure means "down"; /health must not raise
            log.debug("postgres_check_failed", error=repr(exc))
            return "down"
        return "ok"

    def _require(self) -> Any:
        if self._pool is None:
            raise RuntimeError("JobStore.start() was not called")
        return self._pool
