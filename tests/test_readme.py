"""README.md stays true: every variable and every Prometheus metric is documented."""

from __future__ import annotations

from pathlib import Path

from streamsrv.config import known_variables
from streamsrv.metrics import Metrics
from streamsrv.postcall.worker_metrics import WorkerMetrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_variable_is_in_the_readme() -> None:
    missing = sorted(v for v in known_variables() if f"`{v}`" not in README)
    assert not missing


def test_every_metric_is_in_the_readme() -> None:
    names = {
        m.name.removeprefix("streamsrv_") + ("_total" if m.type == "counter" else "")
        for registry in (Metrics().registry, WorkerMetrics().registry)
        for m in registry.collect()
    }
    missing = sorted(n for n in names if f"`{n}`" not in README and f"`{n}{{" not in README)
    assert not missing


def test_readme_names_the_test_command() -> None:
    assert "make test" in README and "make run" in README
