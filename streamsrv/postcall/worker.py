"""`streamsrv worker`: takes post-call jobs from Postgres and runs the post-call pass on each.

The event loop only talks to Postgres and Redis: it claims up to WORKER_CONCURRENCY jobs, renews
their leases every third of JOB_LEASE_SECONDS, stores results, and publishes `postcall_done` (or
`postcall_failed`) on the lifecycle channel. Reading the recording and all model work run in a
thread per job, so renewals stay on time however long a recording takes. The threads are daemon
threads: a forced stop gives the jobs back to the queue and exits without waiting for the model.

Signals as in the server: the first SIGTERM (or SIGINT) stops claiming and lets the running jobs
finish; a second gives the running jobs back (queued, the attempt not counted) and exits.
With drain=True the worker exits by itself once no job is left that it could take.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as redis
import structlog

from streamsrv import events
from streamsrv.config import Settings
from streamsrv.conversation import merge_legs
from streamsrv.jobs import JobStore
from streamsrv.metrics_endpoint import MetricsEndpoint
from streamsrv.postcall.cache import ResultCache, cache_key
from streamsrv.postcall.transcribe import Outcome, PostcallModel
from streamsrv.postcall.worker_metrics import WorkerMetrics
from streamsrv.queue_watch import QueueWatch
from streamsrv.repositories import Job, JobRepository

log = structlog.get_logger(__name__)

T = TypeVar("T")

# What a lost connection to Postgres looks like; the worker waits and tries again.
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run fn in a new daemon thread and await its result (as asyncio.to_thread does, but a
    process that is told to stop need not wait for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def abandoned_jobs() -> list[threading.Thread]:
    """Job threads still running after a forced stop gave their jobs back."""
    return [t for t in threading.enumerate() if t.name.startswith("postcall-") and t.is_alive()]


def read_recording(path: str) -> tuple[bytes, str]:
    """The recording's bytes and their SHA-256."""
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _cached_outcome(hit: dict[str, Any] | None) -> Outcome | None:
    """A cache entry as an Outcome; an entry of another shape is a miss, not a failure."""
    if hit is None:
        return None
    try:
        outcome = Outcome.from_json(hit)
        float(outcome.timings["audio_seconds"])
    except (TypeError, KeyError, ValueError):
        log.warning("result_cache_entry_ignored", keys=sorted(hit))
        return None
    return outcome


class Worker:
    """One worker process's loop. `model` may be shared (tests, benchmarks)."""

    def __init__(self, settings: Settings, model: PostcallModel | None = None) -> None:
        self.settings = settings
        self.model = model or PostcallModel(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.store = JobStore(settings)
        self.channel = events.Channels(settings.redis_channel_prefix).lifecycle
        self.metrics = WorkerMetrics()
        self.endpoint: MetricsEndpoint | None = None  # with WORKER_METRICS_PORT
        self._watch: QueueWatch | None = None
        self._queue: JobRepository | None = None
        self._redis: redis.Redis | None = None
        self._cache: ResultCache | None = None
        self._tasks: dict[asyncio.Task[None], Job] = {}
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        self._queue = JobRepository(self.store, self.settings, self.name)
        self._redis = redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        self._cache = ResultCache(self._redis, self.settings.result_cache_ttl)
        await self._serve_metrics()
        log.info(
            "worker_started",
            worker=self.name,
            model=self.model.label,
            concurrency=self.settings.worker_concurrency,
        )

    async def _serve_metrics(self) -> None:
        """GET /metrics on the worker's own port, and the queue's gauges kept fresh."""
        s = self.settings
        if not s.worker_metrics_port:
            return
        self.endpoint = MetricsEndpoint(self.metrics.registry, "WORKER_METRICS_PORT")
        try:
            await self.endpoint.start(s.worker_metrics_host, s.worker_metrics_port)
        except OSError:
            await self.close()
            raise
        self._watch = QueueWatch(self.queue.overview, on_read=self.metrics.queue_read)
        self._watch.start()
        log.info("worker_metrics_listening", host=s.worker_metrics_host, port=self.endpoint.port)

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self._redis is not None:
            await self._redis.aclose()
        await self.store.close()
        log.info("worker_stopped", worker=self.name, **self.metrics.totals())

    def stop(self) -> None:
        """Signal handler: the first asks to finish the running jobs, the second to give them
        back and leave now."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()
        self._changed.set()

    async def run(self, drain: bool = False) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        try:
            await self.serve(drain)
        finally:
            await self.close()

    @property
    def queue(self) -> JobRepository:
        if self._queue is None:
            raise RuntimeError("Worker.start() was not called")
        return self._queue

    # -- the loop ------------------------------------------------------------------------------

    async def serve(self, drain: bool = False) -> None:
        """Claim and run jobs until stopped (or, with drain, until none is left to take)."""
        s = self.settings
        while not self._stop.is_set():
            self._changed.clear()
            wait = s.worker_poll_interval
            try:
                free = s.worker_concurrency - len(self._tasks)
                claimed = await self.queue.claim(free) if free > 0 else []
                for job in claimed:
                    self.metrics.claimed.inc()
                    if job.reclaimed:
                        self.metrics.leases_lost.labels("expired").inc()
                    self._spawn(job)
                if claimed and len(claimed) == free:
                    continue  # there may be more: claim again when a slot frees
                if drain and not self._tasks:
                    waiting, next_in = await self.queue.waiting()
                    if waiting == 0:
                        log.info("queue_drained", worker=self.name, **self.metrics.totals())
                        break
                    wait = min(wait, max(0.05, next_in or 0.0))
            except DB_ERRORS as exc:
                log.warning("queue_unavailable", error=repr(exc), retry_in=wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
        await self._finish_running()

    def _spawn(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._run_job(job))
        self._tasks[task] = job
        self.metrics.running.inc()

        def done(finished: asyncio.Task[None]) -> None:
            self.metrics.running.dec()
            self._tasks.pop(finished, None)
            self._changed.set()

        task.add_done_callback(done)

    async def _finish_running(self) -> None:
        """Stopping: let the running jobs end, or on a forced stop give them back."""
        while self._tasks and not self._force.is_set():
            self._changed.clear()
            await self._changed.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one job -------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        bound = log.bind(job_id=job.id, call_id=job.call_id, attempt=job.attempts)
        if job.attempts > self.settings.max_retries + 1:
            # Claimed again and again without an outcome: its workers died on it.
            error = (
                f"lease expired {job.attempts - 1} times (the worker holding it stopped);"
                f" last error: {job.previous_error}"
            )
            await self._failed_attempt(job, error, bound)
            return
        bound.info("job_claimed", worker=self.name, priority=job.priority)
        started = time.perf_counter()
        renewing = asyncio.get_running_loop().create_task(self._keep_lease(job))
        try:
            outcome = await self._produce(job)
            with self.metrics.stage_seconds.labels("write").time():
                stored = await self.queue.complete(job, outcome)
        except asyncio.CancelledError:
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.shield(self.queue.release(job))
            bound.warning("job_released")
            raise
        except Exception as exc:
            bound.warning("job_attempt_failed", error=repr(exc))
            await self._failed_attempt(job, f"{type(exc).__name__}: {exc}", bound)
            return
        finally:
            renewing.cancel()
        if not stored:
            self.metrics.leases_lost.labels("taken").inc()
            bound.warning("job_lease_lost", detail="another worker took the job; result dropped")
            return
        self.metrics.done.inc()
        self.metrics.job_seconds.observe(time.perf_counter() - started)
        t = outcome.timings
        bound.info(
            "job_done",
            language=outcome.language,
            seconds=t["total"],
            audio_seconds=t["audio_seconds"],
            rtf=t["real_time_factor"],
            cached=t["cached"],
        )
        if job.conversation:  # before postcall_done: a reader it sends finds the merge there
            with self.metrics.stage_seconds.labels("conversation").time():
                await self._conversation_pass(job.conversation, bound)
        await self._publish(
            events.PostcallDone(
                call_id=job.call_id,
                job_id=job.id,
                language=outcome.language,
                model=outcome.model,
                cached=t["cached"],
                role=job.role,
                conversation=job.conversation,
            )
        )

    async def _conversation_pass(self, conversation: str, bound: Any) -> None:
        """Once every leg's job is done (whichever worker finishes last), the conversation's
        one speaker-labelled transcript. Idempotent: two last legs at once write it twice."""
        try:
            legs = await self.store.calls.conversation_results(conversation)
            if legs is None:
                return
            transcript, turns = merge_legs(legs)
            await self.store.calls.store_conversation(conversation, transcript, turns, len(legs))
        except DB_ERRORS as exc:  # the leg's own result is stored; this one waits for a rerun
            bound.error("conversation_result_not_saved", error=repr(exc))
            return
        bound.info("conversation_done", conversation=conversation, legs=len(legs))

    async def _failed_attempt(self, job: Job, error: str, bound: Any) -> None:
        try:
            status = await self.queue.retry_or_fail(job, error)
        except DB_ERRORS as exc:  # the lease will expire and the job be taken again
            bound.error("job_status_not_saved", error=repr(exc))
            return
        if status is None:
            self.metrics.leases_lost.labels("taken").inc()
        elif status == "queued":
            self.metrics.retried.inc()
            bound.info("job_retry", in_seconds=self.queue.backoff(job.attempts), error=error)
        elif status == "failed":
            self.metrics.failed.inc()
            bound.error("job_failed", error=error)
            await self._publish(
                events.PostcallFailed(
                    call_id=job.call_id, job_id=job.id, attempts=job.attempts, error=error
                )
            )

    async def _keep_lease(self, job: Job) -> None:
        every = self.settings.job_lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.queue.renew(job):
                    log.warning("job_lease_lost", job_id=job.id, call_id=job.call_id)
                    return
            except DB_ERRORS as exc:
                self.metrics.leases_lost.labels("renewal_failed").inc()
                log.warning("lease_renewal_failed", job_id=job.id, error=repr(exc))

    async def _produce(self, job: Job) -> Outcome:
        """The job's outcome: from the result cache when this audio was already processed with
        these settings, else from the model."""
        started = time.perf_counter()
        thread = f"postcall-{job.id}"
        with self.metrics.stage_seconds.labels("read").time():
            data, digest = await in_daemon_thread(lambda: read_recording(job.audio_path), thread)
        key = None
        if self.settings.cache_results:
            assert self._cache is not None
            key = cache_key(
                self.settings.redis_channel_prefix, digest, self.model.fingerprint(job.language)
            )
            outcome = _cached_outcome(await self._cache.get(key))
            if outcome is not None:
                steps = ("load", "decode", "transcribe", "translate", "insights")
                outcome.timings = {
                    **dict.fromkeys(steps, 0.0),
                    "audio_seconds": outcome.timings["audio_seconds"],
                }
                return self._finish(outcome, job, started, cached=True)
        outcome = await in_daemon_thread(lambda: self.model.process(data, job.language), thread)
        self.metrics.observe_model(outcome)
        if key is not None:
            assert self._cache is not None
            await self._cache.put(key, outcome.to_json())
        return self._finish(outcome, job, started, cached=False)

    @staticmethod
    def _finish(outcome: Outcome, job: Job, started: float, cached: bool) -> Outcome:
        """Add what is the call's, not the audio's (DTMF), and the job's own total time."""
        if outcome.insights is not None:
            outcome.insights = {**outcome.insights, "dtmf": job.dtmf}
        total = time.perf_counter() - started
        seconds = outcome.timings["audio_seconds"]
        outcome.timings |= {
            "total": round(total, 3),
            "real_time_factor": round(total / seconds, 4) if seconds else 0.0,
            "cached": cached,
        }
        return outcome

    async def _publish(self, event: events.Event) -> None:
        """To the lifecycle channel; the results are in Postgres whatever happens here."""
        assert self._redis is not None
        try:
            await self._redis.publish(self.channel, json.dumps(events.encode(event)))
        except (redis.RedisError, OSError) as exc:
            log.warning("publish_failed", type=event.TYPE, error=repr(exc))
