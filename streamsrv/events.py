"""Every message streamsrv publishes, one typed class each, and the names it publishes under.

This module is the whole vocabulary of what subscribers see (README, "What it publishes"):
nothing else builds a message dict or formats a channel name. `encode` turns an event into
the JSON object of the contract, `decode` reads one back (for tools that follow calls).

A call's events carry `seq` (per call, from 1) and go to the call's channel; `call_started`,
`call_ended` also go to the lifecycle channel; finals, DTMF and lifecycle events are kept in
the call's stream; an `alert` goes to both. The post-call worker's events have no `seq` and
go to the lifecycle channel only. Optional fields that are None are left out of the JSON (a
final whose model run failed has no `words`, `avg_logprob`, `no_speech_prob`), except those the
contract says may be null.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Channels:
    """Channel and stream names under REDIS_CHANNEL_PREFIX."""

    prefix: str

    @property
    def lifecycle(self) -> str:
        return f"{self.prefix}calls"

    @property
    def all_calls(self) -> str:
        """The pattern of every call's channel (PSUBSCRIBE)."""
        return f"{self.prefix}call:*"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    def stream(self, call_id: str) -> str:
        return f"{self.prefix}stream:{call_id}"

    def conversation(self, conversation: str) -> str:
        """A conversation's finals, all legs, in time order."""
        return f"{self.prefix}conversation:{conversation}"

    def conversation_stream(self, conversation: str) -> str:
        return f"{self.prefix}stream:conversation:{conversation}"

    @property
    def active(self) -> str:
        """Hash: call id -> the server holding it, for calls running now (all servers)."""
        return f"{self.prefix}active"

    @property
    def ended(self) -> str:
        """Sorted set: call ids that ended recently, scored by when."""
        return f"{self.prefix}ended"

    def server(self, server_id: str) -> str:
        """A running server's heartbeat key (expires when it stops beating)."""
        return f"{self.prefix}server:{server_id}"


@dataclass(frozen=True, slots=True)
class WordTime:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Fields common to every message, and where it goes."""

    TYPE: ClassVar[str]
    LIFECYCLE: ClassVar[bool] = False  # also on the lifecycle channel
    STREAMED: ClassVar[bool] = False  # also kept in the call's stream
    PER_CALL: ClassVar[bool] = True  # on the call's channel, with a seq
    NULLABLE: ClassVar[frozenset[str]] = frozenset()  # None is written as null, not left out

    call_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallStarted(Event):
    TYPE = "call_started"
    LIFECYCLE = True
    STREAMED = True

    started_at: float
    peer: str
    sample_rate: int
    processing_mode: str
    context: dict[str, Any] | None = None  # when it was posted before the call connected
    # the language it is transcribed in from its start (context, LANGUAGE, an English-only
    # model); left out when it is to be detected (language_detected says it then)
    language: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallContext(Event):
    """Context posted while the call runs: all of it so far, in effect from now on."""

    TYPE = "call_context"
    LIFECYCLE = True
    STREAMED = True

    context: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class LanguageDetected(Event):
    """With LANGUAGE auto and none in the context: the call's language, decided once from its
    first seconds of speech (or changed on strong evidence, `previous` then says from what)."""

    TYPE = "language_detected"
    LIFECYCLE = True
    STREAMED = True
    NULLABLE = frozenset({"previous"})

    language: str
    probability: float
    at: float  # seconds of call audio when it was decided
    previous: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Partial(Event):
    TYPE = "partial"

    segment: int
    text: str
    start: float
    end: float
    audio_end: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Final(Event):
    TYPE = "final"
    STREAMED = True
    NULLABLE = frozenset({"language", "role", "conversation"})

    segment: int
    text: str
    start: float
    end: float
    language: str | None
    words: list[WordTime] | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    role: str | None = None  # from the call's context
    conversation: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Dtmf(Event):
    TYPE = "dtmf"
    STREAMED = True

    digit: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert(Event):
    """A rule of ALERT_PHRASES (streamsrv.alerts) matched in a final, or in a partial with
    ALERT_ON_PARTIALS: once per rule and segment. Kept in the stream, so that a board that
    reconnects sees it again, and on the lifecycle channel, for a board of every call."""

    TYPE = "alert"
    LIFECYCLE = True
    STREAMED = True
    NULLABLE = frozenset({"label", "language"})

    phrase: str  # the rule's phrase or regular expression, as written
    label: str | None
    language: str | None  # the call's, whose rules matched (None: not known yet, * rules only)
    segment: int
    text: str  # the final's or partial's text
    source: str  # final or partial
    start: float  # the matched words, when their times are known; else the segment's
    end: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEnded(Event):
    TYPE = "call_ended"
    LIFECYCLE = True
    STREAMED = True
    NULLABLE = frozenset({"segments", "job_id"})

    ended_at: float
    duration: float
    audio_seconds: float
    reason: str
    segments: int | None  # None for a call closed out after a crash
    job_id: int | None
    processing_mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcallDone(Event):
    TYPE = "postcall_done"
    LIFECYCLE = True
    PER_CALL = False
    NULLABLE = frozenset({"language", "role", "conversation"})

    job_id: int
    language: str | None
    model: str
    cached: bool
    role: str | None = None  # from the call's context
    conversation: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcallFailed(Event):
    TYPE = "postcall_failed"
    LIFECYCLE = True
    PER_CALL = False

    job_id: int
    attempts: int
    error: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        CallStarted,
        CallContext,
        LanguageDetected,
        Partial,
        Final,
        Dtmf,
        Alert,
        CallEnded,
        PostcallDone,
        PostcallFailed,
    )
}
STREAMED_TYPES = frozenset(t for t, cls in EVENT_TYPES.items() if cls.STREAMED)


def encode(event: Event, seq: int | None = None, emitted_at: float | None = None) -> dict[str, Any]:
    """The message's JSON object: type, call_id, seq (a call's events), emitted_at, fields."""
    message: dict[str, Any] = {"type": event.TYPE, "call_id": event.call_id}
    if event.PER_CALL:
        if seq is None:
            raise ValueError(f"a {event.TYPE} message needs its call's seq")
        message["seq"] = seq
    message["emitted_at"] = time.time() if emitted_at is None else emitted_at
    for f in dataclasses.fields(event):
        if f.name == "call_id":
            continue
        value = getattr(event, f.name)
        if value is None and f.name not in event.NULLABLE:
            continue
        if f.name == "words" and value is not None:
            value = [dataclasses.asdict(w) for w in value]
        message[f.name] = value
    return message


def decode(message: dict[str, Any]) -> Event:
    """The event of a message (extra keys are ignored; a missing one raises KeyError)."""
    cls = EVENT_TYPES[message["type"]]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in message:
            values[f.name] = message[f.name]
        elif f.default is dataclasses.MISSING and f.name not in cls.NULLABLE:
            raise KeyError(f"{message['type']} without {f.name}")
        elif f.name in cls.NULLABLE:
            values[f.name] = message.get(f.name)
    if values.get("words") is not None:
        values["words"] = [WordTime(**w) for w in values["words"]]
    return cls(**values)


__all__ = [
    "EVENT_TYPES",
    "STREAMED_TYPES",
    "Alert",
    "CallContext",
    "CallEnded",
    "CallStarted",
    "Channels",
    "Dtmf",
    "Event",
    "Final",
    "LanguageDetected",
    "Partial",
    "PostcallDone",
    "PostcallFailed",
    "WordTime",
    "decode",
    "encode",
]
