"""Phrase alerts end to end: a real `streamsrv serve` with ALERT_PHRASES, real recorded prompts
whose texts hold the phrases, the real model, Redis and Prometheus."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from streamsrv import corpus
from streamsrv.simulate import play_call
from tests.e2e import Collector
from tests.prom import metric
from tests.serverproc import server_process, subprocess_settings

pytestmark = pytest.mark.e2e

# agent-pass: "Please enter your password followed by the pound key."
# auth-incorrect: "Password incorrect.  Please enter your password followed by the pound key."
PROMPTS = ["agent-pass", "auth-incorrect"]
RULES = """\
# what the test calls say, and one rule for another language
en [keys]: pound key
en: re: \\benter your pass ?word\\b
sw [never]: pound key
"""
POUND = "pound key"
PASSWORD = "\\benter your pass ?word\\b"


def heard(text: str) -> set[str]:
    """The rules a text holds, found independently of streamsrv.alerts."""
    words = " " + re.sub(r"\W+", " ", text.lower()) + " "
    found = {POUND} if " pound key " in words else set()
    return found | ({PASSWORD} if re.search(r" enter your pass ?word ", words) else set())


async def alerted_call(
    settings_env: dict[str, str], tmp_path: Path, speed: float, **overrides: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """One call of PROMPTS through a server with RULES: its messages, the lifecycle channel's,
    its stream's, and /metrics after it."""
    rules = tmp_path / "alert-phrases"
    rules.write_text(RULES)
    settings, env = subprocess_settings(settings_env, ALERT_PHRASES=str(rules), **overrides)
    call = corpus.build_call(PROMPTS, pause=1.2)
    call_id = str(uuid.uuid4())
    async with server_process(env) as server, Collector(settings) as collected:
        await play_call(
            "127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=speed
        )
        await collected.wait_ended([call_id])
        metrics = (await server.get("/metrics"))[1]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = client.xrange(f"{settings.redis_channel_prefix}stream:{call_id}")
    finally:
        client.close()
    stream = [json.loads(fields[b"data"]) for _, fields in entries]
    lifecycle = [m for m in collected.lifecycle if m["call_id"] == call_id]
    return collected.by_call[call_id], lifecycle, stream, metrics


def check_delivery(
    messages: list[dict[str, Any]],
    lifecycle: list[dict[str, Any]],
    stream: list[dict[str, Any]],
    metrics: str,
) -> list[dict[str, Any]]:
    """The call's alerts, after checking they are on every path with the same JSON."""
    alerts = [m for m in messages if m["type"] == "alert"]
    assert [m for m in lifecycle if m["type"] == "alert"] == alerts
    assert [m for m in stream if m["type"] == "alert"] == alerts
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    for source in ("final", "partial"):
        count = sum(a["source"] == source for a in alerts)
        assert metric(metrics, "streamsrv_alerts_total", source=source) == count
    for alert in alerts:
        assert set(alert) == {
            "type", "call_id", "seq", "emitted_at", "phrase", "label", "language",
            "segment", "text", "source", "start", "end",
        }  # fmt: skip
        assert alert["language"] == "en"
        assert alert["label"] == {POUND: "keys", PASSWORD: None}[alert["phrase"]]
    return alerts


async def test_a_phrase_in_a_final_alerts_on_every_path(settings_env, tmp_path):
    messages, lifecycle, stream, metrics = await alerted_call(settings_env, tmp_path, speed=2.0)
    alerts = check_delivery(messages, lifecycle, stream, metrics)
    finals = [m for m in messages if m["type"] == "final"]
    assert sum(POUND in heard(f["text"]) for f in finals) == 2, finals  # the model heard both
    expected = sorted((f["segment"], phrase) for f in finals for phrase in heard(f["text"]))
    assert sorted((a["segment"], a["phrase"]) for a in alerts) == expected
    by_seq = {m["seq"]: m for m in messages}
    for alert in alerts:
        assert alert["source"] == "final"
        final = next(f for f in finals if f["segment"] == alert["segment"])
        assert alert["text"] == final["text"]
        # right after its final (or after that final's other alerts)
        before = by_seq[alert["seq"] - 1]
        assert before is final or (
            before["type"] == "alert" and before["segment"] == alert["segment"]
        )
        if alert["phrase"] == POUND:  # the words' own times, from the final's words
            timed = [
                w
                for w in final["words"]
                if re.sub(r"\W", "", w["word"].lower()) in {"pound", "key"}
            ]
            assert (alert["start"], alert["end"]) == (timed[-2]["start"], timed[-1]["end"])
            assert final["start"] <= alert["start"] < alert["end"] <= final["end"] + 0.5


async def test_with_partials_a_phrase_alerts_once_per_segment(settings_env, tmp_path):
    """At real time on an idle server the partials show the words before the final: a phrase
    alerts on the first partial that holds it, and never again in that segment."""
    messages, lifecycle, stream, metrics = await alerted_call(
        settings_env, tmp_path, speed=1.0, ALERT_ON_PARTIALS="true"
    )
    alerts = check_delivery(messages, lifecycle, stream, metrics)
    segments = {m["segment"] for m in messages if m["type"] == "final"}
    assert len(segments) >= 2
    keys = [(a["segment"], a["phrase"]) for a in alerts]
    assert len(keys) == len(set(keys))  # once per segment
    for segment in segments:
        texts = [
            m for m in messages if m["type"] in ("partial", "final") and m["segment"] == segment
        ]
        for phrase in {p for m in texts for p in heard(m["text"])}:
            first = next(m for m in texts if phrase in heard(m["text"]))
            alert = next(a for a in alerts if (a["segment"], a["phrase"]) == (segment, phrase))
            assert alert["source"] == first["type"]
            assert alert["text"] == first["text"]
            assert alert["seq"] > first["seq"]
            assert not [m for m in texts if first["seq"] < m["seq"] < alert["seq"]]
        assert {a["phrase"] for a in alerts if a["segment"] == segment} == {
            p for m in texts for p in heard(m["text"])
        }
    assert any(a["source"] == "partial" for a in alerts), alerts
