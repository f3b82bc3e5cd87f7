"""`python -m benchmarks.queue_overview`: what one JobRepository.overview() (GET /queue, and the
read behind /health's queue and the worker's gauges every 5 s) costs on a large queue.

Creates a scratch database next to DATABASE_URL's, fills it with `--jobs` jobs (90 % done over
the last `--jobs` seconds, 5 % queued, 4 % failed, 1 % running, eight workers), analyses it, then
times `--reads` overviews one after another. Drops the database at the end."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from streamsrv.config import Settings
from streamsrv.jobs import JobStore

SCRATCH = "streamsrv_queue_overview_bench"
FILL = """
insert into postcall_jobs (call_id, audio_path, status, error, worker, updated_at,
    lease_expires_at)
select call_id, '/bench.wav', s, case when s = 'failed' then 'bench' end,
    'w' || (random() * 7)::int, created_at,
    case when s = 'running' then now() + interval '1 minute' end
from (select call_id, created_at, case when r < 0.9 then 'done' when r < 0.95 then 'queued'
        when r < 0.99 then 'failed' else 'running' end as s
      from (select call_id, created_at, random() as r from calls) x) y
"""


async def run(jobs: int, reads: int) -> None:
    parts = urlsplit(Settings.load(None).database_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    url = urlunsplit(parts._replace(path=f"/{SCRATCH}"))
    conn = await asyncpg.connect(admin)
    await conn.execute(f"drop database if exists {SCRATCH}")
    await conn.execute(f"create database {SCRATCH}")
    store = JobStore(Settings(database_url=url), command_timeout=600)
    try:
        await store.start()
        await store.pool.execute(
            "insert into calls (call_id, created_at, status) select gen_random_uuid(),"
            " now() - make_interval(secs => i), 'ended' from generate_series(1, $1) i",
            jobs,
        )
        await store.pool.execute(FILL)
        await store.pool.execute("vacuum analyze postcall_jobs")
        await store.jobs.overview()
        took = []
        for _ in range(reads):
            started = time.perf_counter()
            overview = await store.jobs.overview()
            took.append(time.perf_counter() - started)
        print(f"jobs {jobs}: {overview.counts()}, {len(overview.workers)} workers")
        print(
            f"overview ms: median {statistics.median(took) * 1000:.1f},"
            f" max {max(took) * 1000:.1f} ({reads} reads)"
        )
    finally:
        await store.close()
        await conn.execute(f"drop database if exists {SCRATCH}")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.reads))


if __name__ == "__main__":
    main()
