"""`streamsrv ari`'s Prometheus metrics, served on ARI_METRICS_HOST:ARI_METRICS_PORT
(streamsrv.metrics_endpoint): whether it is connected to Asterisk, the calls it watches, how
their set-up went and how long it took, and what it took over or removed after a killed run."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From StasisStart to both legs bridged: tens of milliseconds when healthy, seconds when not.
SETUP_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OUTCOMES = ("watching", "failed", "not_continued")


class AriMetrics:
    def __init__(self, watched: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.connected = Gauge(
            "streamsrv_ari_connected", "1 while the ARI event WebSocket is connected", registry=r
        )
        self.connections = Counter(
            "streamsrv_ari_connections", "ARI event WebSockets opened (reconnects)", registry=r
        )
        self.watched = Gauge("streamsrv_ari_watched_channels", "Channels watched now", registry=r)
        self.watched.set_function(lambda: float(watched()))
        self.watches = Counter(
            "streamsrv_ari_watches",
            "Channels that entered the app, by outcome: watching (both legs set up), failed"
            " (a leg could not be set up: torn down, the call untouched), not_continued (the"
            " channel could not be sent on in the dialplan: nothing made)",
            ["outcome"],
            registry=r,
        )
        self.setup_seconds = Histogram(
            "streamsrv_ari_setup_seconds",
            "From a channel's StasisStart to both its legs bridged",
            buckets=SETUP_SECONDS,
            registry=r,
        )
        self.context_failures = Counter(
            "streamsrv_ari_context_failures",
            "Leg context posts streamsrv refused or did not answer (the leg goes on without)",
            registry=r,
        )
        self.adopted = Counter(
            "streamsrv_ari_adopted", "Watches taken over from a run that was killed", registry=r
        )
        self.leftovers_removed = Counter(
            "streamsrv_ari_leftovers_removed",
            "Channels and bridges a killed run left, removed",
            registry=r,
        )
        for outcome in OUTCOMES:
            self.watches.labels(outcome)
