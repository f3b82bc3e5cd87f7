"""Prometheus metrics, in a registry owned by the server (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 32)
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


class Metrics:
    def __init__(self) -> None:
        """Connections and calls here; the rest in _model_metrics."""
        r = self.registry = CollectorRegistry()
        self.calls_active = Gauge("streamsrv_calls_active", "Calls connected now", registry=r)
        self.calls_total = Counter("streamsrv_calls", "Calls accepted", registry=r)
        self.calls_ended = Counter(
            "streamsrv_calls_ended", "Calls ended, by reason", ["reason"], registry=r
        )
        self.calls_without_live_asr = Counter(
            "streamsrv_calls_without_live_asr",
            "Calls served as postcall_only because the model was saturated when they started",
            registry=r,
        )
        self.frames_received = Counter(
            "streamsrv_frames_received", "AudioSocket audio messages received", registry=r
        )
        self.bytes_received = Counter(
            "streamsrv_bytes_received", "AudioSocket audio payload bytes received", registry=r
        )
        self.connections_refused = Counter(
            "streamsrv_connections_refused",
            "Connections closed at once, by reason",
            ["reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "streamsrv_protocol_errors", "Connections ended by a protocol violation", registry=r
        )
        self._model_metrics(r)

    def _model_metrics(self, r: CollectorRegistry) -> None:
        """What the calls publish and what the model does; the disk, the loop."""
        self.dtmf = Counter("streamsrv_dtmf", "DTMF keys received", registry=r)
        self.partials = Counter("streamsrv_partials", "Partial transcripts published", registry=r)
        self.finals = Counter("streamsrv_finals", "Final transcripts published", registry=r)
        self.alerts = Counter(
            "streamsrv_alerts",
            "Phrase alerts published (ALERT_PHRASES), by what matched: final or partial",
            ["source"],
            registry=r,
        )
        self.partials_shed = Counter(
            "streamsrv_partials_shed",
            "Partial updates skipped because the queue was full",
            registry=r,
        )
        self.batch_size = Histogram(
            "streamsrv_inference_batch_size",
            "Windows per model batch",
            buckets=BATCH_SIZES,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "streamsrv_inference_batch_duration_seconds",
            "Model time per batch",
            buckets=SECONDS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "streamsrv_inference_queue_wait_seconds",
            "Time a batch's oldest window waited",
            buckets=SECONDS,
            registry=r,
        )
        self.queue_length = Gauge(
            "streamsrv_inference_queue_length", "Windows waiting for the model", registry=r
        )
        self.jobs_written = Counter(
            "streamsrv_postcall_jobs", "Post-call jobs written to Postgres", registry=r
        )
        self.recording_errors = Counter(
            "streamsrv_recording_errors", "Calls whose recording hit a disk error", registry=r
        )
        self.loop_lag_seconds = Histogram(
            "streamsrv_event_loop_lag_seconds",
            "Lateness of the scheduler tick",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        # Read when scraped (Gauge.set_function): the server sets the functions.
        self.redis_up = Gauge("streamsrv_redis_up", "1 while Redis takes publishes", registry=r)
        self.postgres_up = Gauge(
            "streamsrv_postgres_up",
            "1 while call rows and jobs go straight to Postgres (nothing spooled)",
            registry=r,
        )
        self.spooled_writes = Gauge(
            "streamsrv_spooled_writes",
            "Call rows and jobs in the spool, waiting for Postgres",
            registry=r,
        )

    def observe_batch(self, size: int, seconds: float, waited: float) -> None:
        """Called from executor threads; prometheus_client metrics are thread-safe."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.queue_wait_seconds.observe(waited)

    def render(self) -> bytes:
        return generate_latest(self.registry)
