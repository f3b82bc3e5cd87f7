"""configs/grafana/streamsrv.json stays true: every metric its queries use is exported by the
server, the worker or `streamsrv ari`, and it loads in any Grafana (unique panel ids, every
panel placed, the Prometheus data source chosen by a variable)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from streamsrv.ari_metrics import AriMetrics
from streamsrv.metrics import Metrics
from streamsrv.postcall.worker_metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "configs" / "grafana" / "streamsrv.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def exported(registry: CollectorRegistry) -> set[str]:
    """The names of the series a registry's metrics are scraped as (labelled or not)."""
    return {
        family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]
    }


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_metric_queried_is_exported() -> None:
    known = exported(Metrics().registry) | exported(WorkerMetrics().registry)
    known |= exported(AriMetrics(lambda: 0).registry)
    used = {
        name
        for target in targets(load())
        for name in re.findall(r"\bstreamsrv_[a-zA-Z0-9_]+", target["expr"])
    }
    assert used and not sorted(used - known)


def test_the_dashboard_covers_the_server_and_the_worker() -> None:
    exprs = " ".join(t["expr"] for t in targets(load()))
    for name in (
        "streamsrv_calls_active",
        "streamsrv_inference_queue_length",
        "streamsrv_partials_shed_total",
        "streamsrv_redis_up",
        "streamsrv_postgres_up",
        "streamsrv_spooled_writes",
        "streamsrv_event_loop_lag_seconds_bucket",
        "streamsrv_alerts_total",
        "streamsrv_worker_jobs_claimed_total",
        "streamsrv_worker_queue_jobs",
        "streamsrv_worker_stage_duration_seconds_bucket",
        "streamsrv_worker_leases_lost_total",
    ):
        assert name in exprs, name


def test_panels_are_unique_and_placed() -> None:
    dashboard = load()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    for a, b in itertools.combinations(panels, 2):  # no panel drawn over another
        ga, gb = a["gridPos"], b["gridPos"]
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, (a["title"], b["title"])


def test_the_data_source_is_a_variable() -> None:
    """Imported into any Grafana, the panels ask for whichever Prometheus is chosen."""
    dashboard = load()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source and target["expr"] and target["refId"]
