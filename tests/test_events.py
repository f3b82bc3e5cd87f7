"""Every message type against the documented JSON (README, "What it publishes"): decoded to its
typed event and encoded back to the same object, with the same keys in the same order."""

from __future__ import annotations

import json

import pytest

from streamsrv import events

CALL = "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"
DOCUMENTED = [
    {"type": "call_started", "call_id": CALL, "seq": 1, "emitted_at": 1764720000.5,
     "started_at": 1764720000.4, "peer": "127.0.0.1:40000", "sample_rate": 8000,
     "processing_mode": "hybrid"},
    # context posted before the call connected
    {"type": "call_started", "call_id": CALL, "seq": 1, "emitted_at": 1764720000.5,
     "started_at": 1764720000.4, "peer": "127.0.0.1:40001", "sample_rate": 8000,
     "processing_mode": "hybrid", "context": {"role": "agent", "queue": "sales"}},
    # its language known from the start (context, LANGUAGE, an English-only model)
    {"type": "call_started", "call_id": CALL, "seq": 1, "emitted_at": 1764720000.5,
     "started_at": 1764720000.4, "peer": "127.0.0.1:40002", "sample_rate": 8000,
     "processing_mode": "hybrid", "language": "sw"},
    {"type": "partial", "call_id": CALL, "seq": 2, "emitted_at": 1764720002.0, "segment": 0,
     "text": "please hold", "start": 0.3, "end": 1.5, "audio_end": 1.6},
    {"type": "final", "call_id": CALL, "seq": 3, "emitted_at": 1764720003.0, "segment": 0,
     "text": "Please hold.", "start": 0.3, "end": 1.9, "language": "en",
     "words": [{"word": "Please", "start": 0.3, "end": 0.6, "probability": 0.9},
               {"word": "hold.", "start": 0.6, "end": 1.1, "probability": 0.8}],
     "avg_logprob": -0.2, "no_speech_prob": 0.01, "role": "caller", "conversation": "1764.7"},
    # a final whose model run failed: no words or scores, the call's language (none known)
    {"type": "final", "call_id": CALL, "seq": 4, "emitted_at": 1764720004.0, "segment": 1,
     "text": "", "start": 2.0, "end": 3.0, "language": None, "role": None,
     "conversation": None},
    # context posted while the call runs: all of it so far
    {"type": "call_context", "call_id": CALL, "seq": 5, "emitted_at": 1764720004.5,
     "context": {"language": "en", "role": "caller", "conversation": "1764.7",
                 "tags": {"line": "7"}}},
    {"type": "language_detected", "call_id": CALL, "seq": 4, "emitted_at": 1764720003.5,
     "language": "sw", "probability": 0.91, "at": 3.4, "previous": None},
    {"type": "dtmf", "call_id": CALL, "seq": 5, "emitted_at": 1764720005.0, "digit": "#",
     "at": 4.2},
    {"type": "alert", "call_id": CALL, "seq": 6, "emitted_at": 1764720005.5,
     "phrase": "kill myself", "label": "self-harm", "language": "en", "segment": 1,
     "text": "I want to kill myself.", "source": "final", "start": 3.1, "end": 3.9},
    # a rule without a label, for any language, matched before the call's language was known
    {"type": "alert", "call_id": CALL, "seq": 7, "emitted_at": 1764720005.6,
     "phrase": "\\bpolice\\b", "label": None, "language": None, "segment": 2,
     "text": "call the police", "source": "partial", "start": 4.0, "end": 5.0},
    {"type": "call_ended", "call_id": CALL, "seq": 6, "emitted_at": 1764720006.0,
     "ended_at": 1764720006.0, "duration": 5.6, "audio_seconds": 5.5, "reason": "hangup",
     "segments": 2, "job_id": 7, "processing_mode": "hybrid"},
    # closed out after a crash: segments unknown, the job waiting in the spool
    {"type": "call_ended", "call_id": CALL, "seq": 9, "emitted_at": 1764720009.0,
     "ended_at": 1764720006.0, "duration": 5.6, "audio_seconds": 5.5,
     "reason": "interrupted", "segments": None, "job_id": None,
     "processing_mode": "postcall_only"},
    {"type": "postcall_done", "call_id": CALL, "emitted_at": 1764720100.0, "job_id": 7,
     "language": "en", "model": "base", "cached": False, "role": "caller",
     "conversation": "1764.7"},
    {"type": "postcall_failed", "call_id": CALL, "emitted_at": 1764720100.0, "job_id": 7,
     "attempts": 3, "error": "decode failed"},
]  # fmt: skip


@pytest.mark.parametrize("message", DOCUMENTED, ids=lambda m: m["type"])
def test_every_message_round_trips_through_its_event(message: dict) -> None:
    event = events.decode(message)
    assert type(event) is events.EVENT_TYPES[message["type"]]
    again = events.encode(event, message.get("seq"), message["emitted_at"])
    assert json.dumps(again) == json.dumps(message)


def test_every_type_is_covered_and_routed_as_documented() -> None:
    assert {m["type"] for m in DOCUMENTED} == set(events.EVENT_TYPES)
    lifecycle = {t for t, cls in events.EVENT_TYPES.items() if cls.LIFECYCLE}
    assert lifecycle == {
        "call_started",
        "call_context",
        "language_detected",
        "alert",
        "call_ended",
        "postcall_done",
        "postcall_failed",
    }
    streamed = {"call_started", "call_context", "language_detected", "final", "dtmf", "call_ended"}
    assert streamed | {"alert"} == events.STREAMED_TYPES


def test_a_calls_event_needs_its_seq_and_a_message_its_fields() -> None:
    with pytest.raises(ValueError, match="seq"):
        events.encode(events.Dtmf(call_id=CALL, digit="1", at=0.0))
    with pytest.raises(KeyError, match="digit"):
        events.decode({"type": "dtmf", "call_id": CALL, "seq": 1, "emitted_at": 0.0, "at": 1.0})


def test_channel_and_stream_names() -> None:
    names = events.Channels("site1:")
    assert names.call(CALL) == f"site1:call:{CALL}"
    assert names.stream(CALL) == f"site1:stream:{CALL}"
    assert names.lifecycle == "site1:calls"
    assert names.all_calls == "site1:call:*"
