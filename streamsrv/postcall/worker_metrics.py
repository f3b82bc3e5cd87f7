"""The worker's Prometheus metrics, in a registry of its own, served on WORKER_METRICS_HOST:
WORKER_METRICS_PORT (streamsrv.metrics_endpoint). Every worker process has its own port, so
Prometheus sees each one as a target of its own; the queue's gauges are the same from any of
them (they are read from Postgres), the counters are the process's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamsrv.repositories import QueueOverview

if TYPE_CHECKING:
    from streamsrv.postcall.transcribe import Outcome

# A stage takes from milliseconds (reading a recording) to minutes (a long call on a CPU).
STAGE_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The stages a job's time is observed in (`stage` label), in the order they run.
STAGES = ("read", "load", "decode", "transcribe", "translate", "insights", "write", "conversation")
QUEUE_STATES = ("queued", "running", "failed", "done_last_hour")


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.claimed = Counter("streamsrv_worker_jobs_claimed", "Jobs claimed", registry=r)
        self.done = Counter("streamsrv_worker_jobs_done", "Jobs done, results stored", registry=r)
        self.retried = Counter(
            "streamsrv_worker_jobs_retried", "Failed attempts queued again", registry=r
        )
        self.failed = Counter(
            "streamsrv_worker_jobs_failed", "Jobs failed for good (no retries left)", registry=r
        )
        self.running = Gauge("streamsrv_worker_jobs_running", "Jobs running now", registry=r)
        self.leases_lost = Counter(
            "streamsrv_worker_leases_lost",
            "Leases lost, by reason: expired (this worker took over a job whose holder's lease"
            " had expired), taken (another worker held the job when this one renewed or wrote"
            " it), renewal_failed (a renewal did not reach Postgres)",
            ["reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "streamsrv_worker_stage_duration_seconds",
            "Time of one job in one stage (model stages only when not answered by the cache)",
            ["stage"],
            buckets=STAGE_SECONDS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "streamsrv_worker_job_duration_seconds",
            "Time from claim to stored result of a job done",
            buckets=STAGE_SECONDS,
            registry=r,
        )
        self.queue = Gauge(
            "streamsrv_worker_queue_jobs",
            "Jobs in the queue by state (done_last_hour: done in the last hour), read from"
            " Postgres every few seconds",
            ["state"],
            registry=r,
        )
        for stage in STAGES:  # every series exists from the start, at zero
            self.stage_seconds.labels(stage)
        for reason in ("expired", "taken", "renewal_failed"):
            self.leases_lost.labels(reason)

    def observe_model(self, outcome: Outcome) -> None:
        """The model's stages that ran for a job (load: only when this job loaded it)."""
        t = outcome.timings
        ran = {
            "load": t["load"] > 0,
            "decode": True,
            "transcribe": True,
            "translate": outcome.translation is not None,
            "insights": outcome.insights is not None,
        }
        for stage, did in ran.items():
            if did:
                self.stage_seconds.labels(stage).observe(t[stage])

    def queue_read(self, overview: QueueOverview) -> None:
        for state, n in overview.counts().items():
            self.queue.labels(state).set(n)

    def totals(self) -> dict[str, int]:
        """Jobs done, retried, failed and leases lost so far, for the worker's log lines."""
        value = self.registry.get_sample_value
        lost = sum(
            value("streamsrv_worker_leases_lost_total", {"reason": reason}) or 0.0
            for reason in ("expired", "taken", "renewal_failed")
        )
        return {
            "done": int(value("streamsrv_worker_jobs_done_total") or 0),
            "retried": int(value("streamsrv_worker_jobs_retried_total") or 0),
            "failed": int(value("streamsrv_worker_jobs_failed_total") or 0),
            "lost": int(lost),
        }
