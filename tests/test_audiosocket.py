"""Tests for the sans-IO AudioSocket codec.

Wire bytes are built by hand (``frame``) from the facts in shared/AUDIOSOCKET.md, not with
``encode``, so that a shared mistake in encoder and decoder cannot hide; ``encode`` gets its own
exact-bytes tests and the round trip.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsrv.audiosocket import (
    AUDIO_RATES,
    NEED_DATA,
    Audio,
    AudioRun,
    CallId,
    ConnectionClosed,
    Decoder,
    Dtmf,
    Error,
    Event,
    Hangup,
    Kind,
    Message,
    ProtocolError,
    audio_kind_for_rate,
    encode,
)

CALL_UUID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
CALL_ID = str(CALL_UUID)


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One message, written out from the spec: kind, big-endian length, payload."""
    return bytes([kind]) + len(payload).to_bytes(2, "big") + payload


CALL_ID_FRAME = frame(0x01, CALL_UUID.bytes)


def outcome(chunks: list[bytes], eof: bool = True) -> tuple[list[Event], str | None]:
    """Feed ``chunks`` one read at a time, draining events after each, then EOF (if ``eof``);
    stop at the first ConnectionClosed, as a server would.

    Empty chunks are skipped (a socket read returns b"" only at EOF). Returns the events and
    the ProtocolError message (None if none was raised).
    """
    decoder = Decoder()
    reads = [chunk for chunk in chunks if chunk]
    if eof:
        reads.append(b"")
    events: list[Event] = []
    try:
        for chunk in reads:
            decoder.receive_data(chunk)
            # A read completes at most one pending message, len(chunk) // 3 new ones and a
            # ConnectionClosed: the cap turns an events() that never stops into a failure.
            # (Appended one by one: events before a ProtocolError in the same read count.)
            for count, event in enumerate(decoder.events()):
                assert count <= len(chunk) + 1, "events() did not stop"
                events.append(event)
            if events and isinstance(events[-1], ConnectionClosed):
                break
    except ProtocolError as exc:
        return events, str(exc)
    return events, None


def outcome_by_runs(
    chunks: list[bytes], limit: int, eof: bool = True
) -> tuple[list[Event | AudioRun], str | None]:
    """Like ``outcome``, but drained as the server does: ``next_audio_run`` first, then
    ``next_event``. Returns what came out with audio merged as by ``merged``."""
    decoder = Decoder()
    reads = [chunk for chunk in chunks if chunk] + ([b""] if eof else [])
    out: list[Event | AudioRun] = []
    try:
        for chunk in reads:
            decoder.receive_data(chunk)
            for _ in range(len(chunk) + 2):  # a message, or the end, per turn
                run = decoder.next_audio_run(limit)
                if run is not None:
                    assert 1 <= run.messages <= limit
                    out.append(run)
                    continue
                event = decoder.next_event()
                if event is NEED_DATA:
                    break
                out.append(event)
                if isinstance(event, ConnectionClosed):
                    break
            else:
                raise AssertionError("draining did not stop")
            if out and isinstance(out[-1], ConnectionClosed):
                break
    except ProtocolError as exc:
        return merged(out), str(exc)
    return merged(out), None


def merged(items: list[Event] | list[Event | AudioRun]) -> list[Event | AudioRun]:
    """Consecutive audio of one kind, as one AudioRun: what two drains must agree on."""
    out: list[Event | AudioRun] = []
    for item in items:
        if isinstance(item, Audio):
            item = AudioRun(item.kind, item.payload, 1)
        last = out[-1] if out else None
        if isinstance(item, AudioRun) and isinstance(last, AudioRun) and last.kind == item.kind:
            out[-1] = AudioRun(
                item.kind, last.payload + item.payload, last.messages + item.messages
            )
        else:
            out.append(item)
    return out


def drain(decoder: Decoder, limit: int = 1000) -> list[Event]:
    """next_event() until NEED_DATA or ConnectionClosed (bounded, so a bug cannot hang us)."""
    events: list[Event] = []
    for _ in range(limit):
        event = decoder.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events
    raise AssertionError(f"no NEED_DATA or ConnectionClosed after {limit} events")


def decode_ok(data: bytes) -> list[Event]:
    events, error = outcome([data])
    assert error is None, error
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------------------------
# A realistic call: call id, 8 kHz prompt with a short last frame, DTMF, 16 kHz audio, EOF.

PCM_320 = bytes(range(256)) + bytes(range(64))
EXAMPLE_MESSAGES: list[tuple[bytes, Event]] = [
    (CALL_ID_FRAME, CallId(CALL_ID)),
    (frame(0x10, PCM_320), Audio(Kind.AUDIO_8K, PCM_320)),
    (frame(0x10, PCM_320[::-1]), Audio(Kind.AUDIO_8K, PCM_320[::-1])),
    (frame(0x10, PCM_320[:24]), Audio(Kind.AUDIO_8K, PCM_320[:24])),
    (frame(0x03, b"5"), Dtmf("5")),
    (frame(0x03, b"#"), Dtmf("#")),
    (frame(0x12, PCM_320 * 2), Audio(Kind.AUDIO_16K, PCM_320 * 2)),
    (frame(0x12, b"\x01"), Audio(Kind.AUDIO_16K, b"\x01")),
]
EXAMPLE_STREAM = b"".join(wire for wire, _ in EXAMPLE_MESSAGES)
EXAMPLE_EVENTS: list[Event] = [event for _, event in EXAMPLE_MESSAGES] + [ConnectionClosed()]


def test_example_stream_at_once() -> None:
    assert decode_ok(EXAMPLE_STREAM) == EXAMPLE_EVENTS


def test_example_stream_byte_by_byte() -> None:
    chunks = [EXAMPLE_STREAM[i : i + 1] for i in range(len(EXAMPLE_STREAM))]
    assert outcome(chunks) == (EXAMPLE_EVENTS, None)


def test_example_stream_every_two_way_split() -> None:
    for cut in range(len(EXAMPLE_STREAM) + 1):
        chunks = [EXAMPLE_STREAM[:cut], EXAMPLE_STREAM[cut:]]
        assert outcome(chunks) == (EXAMPLE_EVENTS, None), f"split at {cut}"


def test_byte_by_byte_yields_each_event_exactly_when_its_last_byte_arrives() -> None:
    decoder = Decoder()
    end = 0
    for wire, expected in EXAMPLE_MESSAGES:
        end += len(wire)
        for i in range(end - len(wire), end - 1):
            decoder.receive_data(EXAMPLE_STREAM[i : i + 1])
            assert decoder.next_event() is NEED_DATA
        decoder.receive_data(EXAMPLE_STREAM[end - 1 : end])
        assert decoder.next_event() == expected
        assert decoder.next_event() is NEED_DATA


def test_coalesced_reads_several_calls_worth_of_messages_per_read() -> None:
    # Reads that each hold several messages and end mid-message, as after a scheduling hiccup.
    chunks = [EXAMPLE_STREAM[i : i + 500] for i in range(0, len(EXAMPLE_STREAM), 500)]
    assert len(chunks) > 2
    assert outcome(chunks) == (EXAMPLE_EVENTS, None)


def test_events_stops_at_need_data_without_eof() -> None:
    decoder = Decoder()
    decoder.receive_data(EXAMPLE_STREAM[:-1])
    assert list(decoder.events()) == EXAMPLE_EVENTS[:-2]
    assert decoder.next_event() is NEED_DATA
    assert list(decoder.events()) == []
    decoder.receive_data(EXAMPLE_STREAM[-1:])
    assert list(decoder.events()) == [EXAMPLE_EVENTS[-2]]


def test_bytes_received_and_call_id() -> None:
    decoder = Decoder()
    assert decoder.bytes_received == 0
    assert decoder.call_id is None
    decoder.receive_data(CALL_ID_FRAME[:10])
    assert decoder.next_event() is NEED_DATA
    assert decoder.call_id is None
    decoder.receive_data(CALL_ID_FRAME[10:] + frame(0x10, b"ab"))
    assert decoder.bytes_received == len(CALL_ID_FRAME) + 5
    assert decoder.next_event() == CallId(CALL_ID)
    assert decoder.call_id == CALL_ID
    decoder.receive_data(b"")
    assert decoder.bytes_received == len(CALL_ID_FRAME) + 5  # EOF is not a byte


# ---------------------------------------------------------------------------------------------
# Every kind


def test_kind_values_match_the_wire_protocol() -> None:
    assert {k.name: int(k) for k in Kind} == {
        "HANGUP": 0x00,
        "UUID": 0x01,
        "DTMF": 0x03,
        "AUDIO_8K": 0x10,
        "AUDIO_12K": 0x11,
        "AUDIO_16K": 0x12,
        "AUDIO_24K": 0x13,
        "AUDIO_32K": 0x14,
        "AUDIO_44K": 0x15,
        "AUDIO_48K": 0x16,
        "AUDIO_96K": 0x17,
        "AUDIO_192K": 0x18,
        "ERROR": 0xFF,
    }


RATES = {
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
}


def test_audio_rates_table() -> None:
    assert dict(AUDIO_RATES) == RATES


@pytest.mark.parametrize(("kind", "rate"), sorted(RATES.items()))
def test_audio_of_every_rate(kind: int, rate: int) -> None:
    payload = bytes(range(200)) * 3  # 600 bytes, not a multiple of anyone's frame size
    events = decode_ok(CALL_ID_FRAME + frame(kind, payload))
    assert events == [CallId(CALL_ID), Audio(kind, payload), ConnectionClosed()]
    audio = events[1]
    assert isinstance(audio, Audio)
    assert audio.kind == kind
    assert audio.payload == payload
    assert audio.sample_rate == rate
    assert audio_kind_for_rate(rate) == kind
    assert encode(Audio(kind, payload)) == frame(kind, payload)


@pytest.mark.parametrize("rate", [0, 11025, 22050, 44000, 64000, -8000])
def test_audio_kind_for_unsupported_rate(rate: int) -> None:
    with pytest.raises(ValueError, match=f"no AudioSocket audio kind for {rate} Hz"):
        audio_kind_for_rate(rate)


@pytest.mark.parametrize("size", [0, 1, 3, 24, 44, 48, 224, 319, 321, 0xFFFF])
def test_audio_of_any_length_passes_through(size: int) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    stream = CALL_ID_FRAME + frame(0x10, PCM_320) + frame(0x10, payload)
    assert decode_ok(stream) == [
        CallId(CALL_ID),
        Audio(0x10, PCM_320),
        Audio(0x10, payload),
        ConnectionClosed(),
    ]


def test_call_id_is_canonical_lowercase_text() -> None:
    raw = bytes.fromhex("ABCDEF0123456789ABCDEF0123456789")
    (event, _closed) = decode_ok(frame(0x01, raw))
    assert event == CallId("abcdef01-2345-6789-abcd-ef0123456789")


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_every_dtmf_digit(digit: str) -> None:
    events = decode_ok(CALL_ID_FRAME + frame(0x03, digit.encode()))
    assert events == [CallId(CALL_ID), Dtmf(digit), ConnectionClosed()]


@pytest.mark.parametrize("digit", list("abcd"))
def test_lowercase_dtmf_is_normalised(digit: str) -> None:
    events = decode_ok(CALL_ID_FRAME + frame(0x03, digit.encode()))
    assert events[1] == Dtmf(digit.upper())


def test_hangup_ends_the_call_and_later_bytes_are_dropped() -> None:
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME + frame(0x00) + frame(0x10, b"late") + b"\x42junk")
    assert decoder.next_event() == CallId(CALL_ID)
    assert decoder.next_event() == Hangup()
    # Whatever follows a hangup (even garbage) is not decoded; the decoder stays closed.
    for _ in range(3):
        assert decoder.next_event() == ConnectionClosed()
    decoder.receive_data(frame(0x10, b"even later"))
    assert decoder.next_event() == ConnectionClosed()
    assert len(decoder._buffer) == 0
    decoder.receive_data(b"")
    assert decoder.next_event() == ConnectionClosed()


def test_events_ends_with_connection_closed_after_hangup() -> None:
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME + frame(0x00))
    assert list(decoder.events()) == [CallId(CALL_ID), Hangup(), ConnectionClosed()]
    assert list(decoder.events()) == [ConnectionClosed()]


@pytest.mark.parametrize(
    ("payload", "expected"), [(b"", Error(None)), (b"\x00", Error(0)), (b"\xfe", Error(0xFE))]
)
def test_error_message(payload: bytes, expected: Error) -> None:
    stream = CALL_ID_FRAME + frame(0xFF, payload) + frame(0x10, b"ignored")
    assert decode_ok(stream) == [CallId(CALL_ID), expected, ConnectionClosed()]


def test_hangup_and_error_before_the_call_id_end_an_empty_call() -> None:
    assert decode_ok(frame(0x00)) == [Hangup(), ConnectionClosed()]
    assert decode_ok(frame(0xFF, b"\x03")) == [Error(3), ConnectionClosed()]


# ---------------------------------------------------------------------------------------------
# EOF


def test_eof_before_any_byte_is_an_empty_call() -> None:
    decoder = Decoder()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    # events() ends after ConnectionClosed instead of repeating it forever.
    assert list(itertools.islice(decoder.events(), 5)) == [ConnectionClosed()]
    assert decoder.next_event() == ConnectionClosed()
    assert decoder.next_event() == ConnectionClosed()
    assert decoder.call_id is None


def test_eof_right_after_call_id_and_after_complete_messages() -> None:
    assert decode_ok(CALL_ID_FRAME) == [CallId(CALL_ID), ConnectionClosed()]
    assert decode_ok(EXAMPLE_STREAM) == EXAMPLE_EVENTS


def test_repeated_eof_is_harmless_but_data_after_eof_is_an_error() -> None:
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME)
    decoder.receive_data(b"")
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"received 3 bytes after EOF at byte offset 19"):
        decoder.receive_data(b"abc")


def test_eof_while_waiting_is_seen_on_next_call() -> None:
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME + frame(0x10, b"xy")[:4])
    assert decoder.next_event() == CallId(CALL_ID)
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="truncated message at EOF"):
        decoder.next_event()


LAST = frame(0x10, PCM_320)


@pytest.mark.parametrize("cut", range(1, len(LAST)))
def test_truncated_message_at_eof(cut: int) -> None:
    stream = EXAMPLE_STREAM + LAST[:cut]
    events, error = outcome([stream])
    assert events == EXAMPLE_EVENTS[:-1]  # everything complete was delivered first
    assert error is not None
    assert error.startswith("truncated message at EOF")
    assert error.endswith(f"at byte offset {len(EXAMPLE_STREAM)}")
    if cut >= 3:
        assert f"announces 320 payload bytes, {cut - 3} arrived" in error


def test_truncated_call_id_at_eof() -> None:
    events, error = outcome([CALL_ID_FRAME[:-1]])
    assert events == []
    assert error == (
        "truncated message at EOF: kind 0x01 announces 16 payload bytes, 15 arrived,"
        " at byte offset 0"
    )


# ---------------------------------------------------------------------------------------------
# Protocol violations: each with its message and the offset of the offending message

AFTER_ID = len(CALL_ID_FRAME)

VIOLATIONS = [
    pytest.param(
        CALL_ID_FRAME + CALL_ID_FRAME,
        f"second call id message at byte offset {AFTER_ID}",
        id="second-call-id",
    ),
    pytest.param(
        frame(0x10, PCM_320) + CALL_ID_FRAME,
        "audio message (kind 0x10) before the call id at byte offset 0",
        id="audio-before-call-id",
    ),
    pytest.param(
        frame(0x16, b""),
        "audio message (kind 0x16) before the call id at byte offset 0",
        id="empty-48k-audio-before-call-id",
    ),
    pytest.param(
        frame(0x03, b"1") + CALL_ID_FRAME,
        "DTMF message (kind 0x03) before the call id at byte offset 0",
        id="dtmf-before-call-id",
    ),
    pytest.param(
        frame(0x01, CALL_UUID.bytes[:15]),
        "call id message with 15-byte payload, expected 16, at byte offset 0",
        id="uuid-15-bytes",
    ),
    pytest.param(
        frame(0x01, CALL_UUID.bytes + b"\x00"),
        "call id message with 17-byte payload, expected 16, at byte offset 0",
        id="uuid-17-bytes",
    ),
    pytest.param(
        frame(0x01, CALL_UUID.hex.encode()),
        "call id message with 32-byte payload, expected 16, at byte offset 0",
        id="uuid-as-hex-text",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x03, b""),
        f"DTMF message with 0-byte payload, expected 1, at byte offset {AFTER_ID}",
        id="dtmf-empty",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x03, b"12"),
        f"DTMF message with 2-byte payload, expected 1, at byte offset {AFTER_ID}",
        id="dtmf-two-chars",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x03, b"E"),
        f"invalid DTMF digit b'E' (expected 0-9 * # A-D) at byte offset {AFTER_ID}",
        id="dtmf-E",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x10, b"ab") + frame(0x03, b"e"),
        f"invalid DTMF digit b'e' (expected 0-9 * # A-D) at byte offset {AFTER_ID + 5}",
        id="dtmf-lowercase-e",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x03, b" "),
        f"invalid DTMF digit b' ' (expected 0-9 * # A-D) at byte offset {AFTER_ID}",
        id="dtmf-space",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x03, b"\xb2"),  # latin-1 superscript two, upper() would be "²"
        f"invalid DTMF digit b'\\xb2' (expected 0-9 * # A-D) at byte offset {AFTER_ID}",
        id="dtmf-non-ascii",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0x00, b"\x00"),
        f"hangup message with 1-byte payload, expected 0, at byte offset {AFTER_ID}",
        id="hangup-with-payload",
    ),
    pytest.param(
        CALL_ID_FRAME + frame(0xFF, b"\x01\x02"),
        f"error message with 2-byte payload, expected 0 or 1, at byte offset {AFTER_ID}",
        id="error-two-bytes",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n\r\n",
        "unknown message kind 0x47 at byte offset 0",
        id="http-request",
    ),
    *(
        pytest.param(
            CALL_ID_FRAME + frame(0x10, PCM_320) + frame(kind, b"\x00\x00"),
            f"unknown message kind 0x{kind:02x} at byte offset {AFTER_ID + 323}",
            id=f"unknown-kind-0x{kind:02x}",
        )
        for kind in (0x02, 0x04, 0x0F, 0x19, 0x80, 0xFE)
    ),
]


@pytest.mark.parametrize(("stream", "message"), VIOLATIONS)
def test_protocol_violation(stream: bytes, message: str) -> None:
    decoder = Decoder()
    decoder.receive_data(stream)
    with pytest.raises(ProtocolError) as info:
        drain(decoder)
    assert str(info.value) == message
    offset = int(message.rsplit(" ", 1)[1])
    assert info.value.offset == offset
    # The same error, at the same point, whatever the reads look like.
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert outcome(chunks)[1] == message
    assert outcome([stream])[1] == message


@pytest.mark.parametrize(
    "header",
    [
        frame(0x42, b"")[:3],
        (CALL_ID_FRAME + CALL_ID_FRAME)[: AFTER_ID + 3],
        frame(0x01, bytes(40))[:3],
        frame(0x10, bytes(10))[:3],
    ],
)
def test_bad_header_fails_before_its_payload_arrives(header: bytes) -> None:
    # A header that can never be valid is rejected at once, not after waiting for the payload.
    decoder = Decoder()
    decoder.receive_data(header)
    with pytest.raises(ProtocolError):
        drain(decoder)


def test_decoder_stays_broken_after_a_protocol_error() -> None:
    decoder = Decoder()
    decoder.receive_data(frame(0x42) + CALL_ID_FRAME)
    with pytest.raises(ProtocolError, match="unknown message kind 0x42"):
        decoder.next_event()
    for _ in range(2):
        with pytest.raises(ProtocolError, match="unusable after earlier error: unknown message"):
            decoder.next_event()
    decoder.receive_data(CALL_ID_FRAME)
    with pytest.raises(ProtocolError):
        decoder.next_event()


# ---------------------------------------------------------------------------------------------
# Encoder


def test_encode_exact_bytes() -> None:
    assert encode(CallId(CALL_ID)) == b"\x01\x00\x10" + CALL_UUID.bytes
    assert encode(CallId(CALL_ID.upper())) == b"\x01\x00\x10" + CALL_UUID.bytes
    assert encode(Audio(Kind.AUDIO_8K, b"\x01\x02\x03")) == b"\x10\x00\x03\x01\x02\x03"
    assert encode(Audio(0x18, bytes(0x1234))) == b"\x18\x12\x34" + bytes(0x1234)
    assert encode(Audio(0x10, b"")) == b"\x10\x00\x00"
    assert encode(Dtmf("#")) == b"\x03\x00\x01#"
    assert encode(Dtmf("b")) == b"\x03\x00\x01B"
    assert encode(Hangup()) == b"\x00\x00\x00"
    assert encode(Error(None)) == b"\xff\x00\x00"
    assert encode(Error(0x2A)) == b"\xff\x00\x01\x2a"


ROUND_TRIP: list[Message] = [
    *(Audio(kind, bytes(range(kind))) for kind in sorted(RATES)),
    *(Dtmf(d) for d in "0123456789*#ABCD"),
]


def test_encode_decode_round_trip() -> None:
    for end in (Hangup(), Error(None), Error(255)):
        messages: list[Message] = [CallId(CALL_ID), *ROUND_TRIP, end]
        stream = b"".join(encode(m) for m in messages)
        assert decode_ok(stream) == [*messages, ConnectionClosed()]


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (Audio(0x01, b""), "kind 0x01 is not an audio kind"),
        (Audio(0x19, b""), "kind 0x19 is not an audio kind"),
        (Audio(0x10, bytes(0x10000)), "payload of 65536 bytes exceeds the 65535-byte limit"),
        (Dtmf("E"), "invalid DTMF digit 'E'"),
        (Dtmf("12"), "invalid DTMF digit '12'"),
        (Dtmf(""), "invalid DTMF digit ''"),
        (Error(256), "error code 256 does not fit in one byte"),
        (Error(-1), "error code -1 does not fit in one byte"),
        (CallId("not-a-uuid"), "badly formed hexadecimal UUID string"),
    ],
)
def test_encode_rejects_invalid_messages(event: Message, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        encode(event)


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError, match="not an AudioSocket message"):
        encode(ConnectionClosed())  # type: ignore[arg-type]


def test_need_data_is_a_singleton() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert copy.copy(NEED_DATA) is NEED_DATA
    assert pickle.loads(pickle.dumps(NEED_DATA)) is NEED_DATA


def test_events_are_frozen_values() -> None:
    assert Audio(0x10, b"a") == Audio(Kind.AUDIO_8K, b"a")
    assert hash(Dtmf("1")) == hash(Dtmf("1"))
    with pytest.raises(AttributeError):
        Dtmf("1").digit = "2"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Linear cost


def test_many_small_messages_in_one_read_are_decoded_with_linear_work() -> None:
    n = 200_000
    body = b"".join(frame(0x10 + (i % 9), bytes([i & 0xFF, 7])) for i in range(n))
    stream = CALL_ID_FRAME + body
    decoder = Decoder()
    decoder.receive_data(stream)
    buf = decoder._buffer
    assert decoder.next_event() == CallId(CALL_ID)
    remaining = len(body)
    biggest_dead_prefix = 0
    for i in range(n):
        event = decoder.next_event()
        assert isinstance(event, Audio)
        assert event.payload == bytes([i & 0xFF, 7])
        remaining -= 5
        assert len(buf) == remaining
        # The consumed prefix never outgrows the larger of the compaction threshold and what is
        # still unread: memory stays O(unread), and nothing is copied per extraction.
        assert buf._start <= max(buf._COMPACT_MIN, len(buf))
        biggest_dead_prefix = max(biggest_dead_prefix, buf._start)
    assert decoder.next_event() is NEED_DATA
    assert len(buf._data) == 0
    # Compaction did happen (so the bound above was exercised) and the bytes it moved in total
    # are at most what was received: linear, where compacting per message would move ~n^2/2 * 5.
    assert buf.bytes_moved > 0
    assert buf.bytes_moved <= len(stream)
    assert biggest_dead_prefix >= buf._COMPACT_MIN


def test_audio_runs_stop_at_another_kind_an_incomplete_message_and_the_limit() -> None:
    decoder = Decoder()
    decoder.receive_data(frame(0x10, b"ab") + frame(0x10, b"cd"))
    assert decoder.next_audio_run() is None  # no call id yet: next_event says what is wrong
    with pytest.raises(ProtocolError, match="before the call id"):
        decoder.next_event()

    decoder = Decoder()
    decoder.receive_data(
        CALL_ID_FRAME
        + b"".join(frame(0x10, bytes([i])) for i in range(5))
        + frame(0x12, b"xy")
        + frame(0x03, b"7")
        + frame(0x10, b"zz")[:4]
    )
    assert decoder.next_audio_run() is None  # the call id comes first
    assert decoder.next_event() == CallId(CALL_ID)
    assert decoder.next_audio_run(limit=3) == AudioRun(Kind.AUDIO_8K, b"\x00\x01\x02", 3)
    assert decoder.next_audio_run() == AudioRun(Kind.AUDIO_8K, b"\x03\x04", 2)
    assert decoder.next_audio_run() == AudioRun(Kind.AUDIO_16K, b"xy", 1)
    assert decoder.next_audio_run() is None
    assert decoder.next_event() == Dtmf("7")
    assert decoder.next_audio_run() is None  # 4 of its 5 bytes are in
    decoder.receive_data(b"z" + frame(0x00))
    assert decoder.next_audio_run() == AudioRun(Kind.AUDIO_8K, b"zz", 1)
    assert decoder.next_audio_run() is None
    assert decoder.next_event() == Hangup()
    decoder.receive_data(frame(0x10, b"late"))
    assert decoder.next_audio_run() is None  # the call is over
    assert decoder.next_event() == ConnectionClosed()


def test_audio_runs_of_many_small_messages_are_decoded_with_linear_work() -> None:
    n = 100_000
    payloads = [bytes([i & 0xFF, 7]) for i in range(n)]
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME + b"".join(frame(0x10, p) for p in payloads))
    assert decoder.next_event() == CallId(CALL_ID)
    runs = []
    while (run := decoder.next_audio_run()) is not None:
        runs.append(run)
    assert [r.messages for r in runs] == [64] * (n // 64) + [n % 64]
    assert b"".join(r.payload for r in runs) == b"".join(payloads)
    assert decoder.next_event() is NEED_DATA
    assert 0 < decoder._buffer.bytes_moved <= 5 * n + len(CALL_ID_FRAME)


def test_steady_stream_keeps_buffer_small() -> None:
    # Reads that each end mid-message (a 320-byte frame arriving in 100-byte pieces).
    decoder = Decoder()
    decoder.receive_data(CALL_ID_FRAME)
    assert decoder.next_event() == CallId(CALL_ID)
    wire = frame(0x10, PCM_320) * 2000
    buf = decoder._buffer
    count = 0
    for i in range(0, len(wire), 100):
        decoder.receive_data(wire[i : i + 100])
        count += sum(1 for _ in decoder.events())
        assert len(buf) < 323  # never a whole frame left unread
        # The consumed prefix is dropped once it reaches the threshold: memory stays bounded
        # even though the buffer is never empty at the end of a read.
        assert len(buf._data) < buf._COMPACT_MIN + 323
    assert count == 2000
    assert buf.bytes_moved > 0


# ---------------------------------------------------------------------------------------------
# Property tests

call_ids = st.uuids().map(lambda u: CallId(str(u)))
audio_messages = st.builds(
    Audio,
    st.sampled_from(sorted(RATES)),
    st.one_of(st.binary(max_size=40), st.binary(min_size=300, max_size=700)),
)
dtmf_messages = st.builds(Dtmf, st.sampled_from("0123456789*#ABCD"))
endings = st.sampled_from([None, Hangup(), Error(None), Error(17)])


@st.composite
def valid_calls(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    body: list[Message] = draw(st.lists(st.one_of(audio_messages, dtmf_messages), max_size=25))
    messages: list[Message] = [draw(call_ids), *body]
    end = draw(endings)
    if end is not None:
        messages.append(end)
    return b"".join(encode(m) for m in messages), [*messages, ConnectionClosed()]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(call=valid_calls(), data=st.data())
def test_valid_stream_split_anywhere_decodes_identically(
    call: tuple[bytes, list[Event]], data: st.DataObject
) -> None:
    stream, expected = call
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert outcome([stream]) == (expected, None)
    assert outcome(split_at(stream, cuts)) == (expected, None)
    limit = data.draw(st.integers(1, 8))
    assert outcome_by_runs(split_at(stream, cuts), limit) == (merged(expected), None)


garbage = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: CALL_ID_FRAME + b),
    # Structured garbage: plausible headers with any kind and sometimes lying lengths.
    st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=20), st.integers(-2, 2)),
        max_size=10,
    ).map(
        lambda parts: (
            CALL_ID_FRAME
            + b"".join(bytes([k]) + max(0, len(p) + d).to_bytes(2, "big") + p for k, p, d in parts)
        )
    ),
)


@settings(max_examples=500)
@given(stream=garbage, data=st.data())
def test_arbitrary_bytes_only_ever_raise_protocol_error(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    # outcome() lets only ProtocolError through as a result; anything else fails the test.
    whole = outcome([stream])
    assert outcome(split_at(stream, cuts)) == whole
    limit = data.draw(st.integers(1, 8))
    assert outcome_by_runs(split_at(stream, cuts), limit) == (merged(whole[0]), whole[1])
    events, error = whole
    # A clean outcome always ends with ConnectionClosed; a failed one names an offset.
    if error is None:
        assert events[-1] == ConnectionClosed()
    else:
        assert re.search(r"byte offset \d+", error)
