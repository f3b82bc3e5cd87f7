"""Reading one sample out of Prometheus text (a GET /metrics body) in tests."""

from __future__ import annotations


def metric(text: str, name: str, **labels: str) -> float:
    """The sample of the series with exactly these labels. 0 for a labelled series that is
    not there (a counter's label values appear with their first increment); an unlabelled one
    that is not there fails (KeyError)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    if labels:
        return 0.0
    raise KeyError(want)
