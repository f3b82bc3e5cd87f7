"""Sans-IO codec for Asterisk AudioSocket, in the shape of python-hyper/h11.

Bytes go in with ``Decoder.receive_data``; typed events come out of ``Decoder.next_event``
(or ``NEED_DATA`` while a message is incomplete), and in a call ``Decoder.next_audio_run`` takes
a run of audio messages at once; ``encode`` turns an event into bytes.
No sockets, no asyncio, no threads: the same object serves the server, the Asterisk
simulator and the tests.
"""

# What the codec must support (facts in shared/AUDIOSOCKET.md):
#   - Framing: 1 byte kind, 2 bytes big-endian payload length, payload (0..65535 bytes).
#   - Kinds: 0x00 hangup, 0x01 call id (16 raw UUID bytes, always first, once), 0x03 DTMF
#     (one ASCII char 0-9 * # A-D), 0x10..0x18 audio at 8..192 kHz, 0xFF error (optional
#     code byte). Anything else is a protocol violation.
#   - TCP gives no message boundaries: a message may be split over any number of reads and
#     several may share one read. EOF ends the call; EOF mid-message is a truncated stream.
#   - Asterisk may connect and close before sending the call id: an empty, normal call.
#
# Goals:
#   - Any split or coalescing of reads decodes to exactly the same events (and the same error).
#   - Linear cost: extracting a short message from a long buffer costs what was consumed, never
#     the buffer's size, so a peer that sends megabytes of tiny frames cannot make us quadratic.
#   - Strict on framing and control messages, neutral on audio: audio payloads of any length
#     (odd, zero) are passed through untouched; what they mean belongs to other modules.
#   - One exception type for bad wire data (ProtocolError), with the byte offset of the culprit.
#
# Plan:
#   - _ReceiveBuffer: a bytearray plus a read offset. Reads advance the offset; the consumed
#     prefix is dropped only when it is at least half the buffer (and not tiny), so every byte is
#     moved at most a constant number of times overall (amortised O(1) per byte).
#   - Decoder: a state machine (awaiting call id, in call, closed, error). The header is validated
#     as soon as its 3 bytes are in, before waiting for the payload, so garbage fails fast.
#   - Events are frozen, slotted dataclasses; NEED_DATA is a single-member enum so that
#     ``event is NEED_DATA`` narrows the type for mypy.

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "AUDIO_RATES",
    "NEED_DATA",
    "Audio",
    "AudioRun",
    "CallId",
    "ConnectionClosed",
    "Decoder",
    "Dtmf",
    "Error",
    "Event",
    "Hangup",
    "Kind",
    "Message",
    "NeedData",
    "ProtocolError",
    "audio_kind_for_rate",
    "encode",
    "starts_with_call_id",
]


class Kind(enum.IntEnum):
    """Message kinds, the first byte of every message."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    AUDIO_8K = 0x10
    AUDIO_12K = 0x11
    AUDIO_16K = 0x12
    AUDIO_24K = 0x13
    AUDIO_32K = 0x14
    AUDIO_44K = 0x15
    AUDIO_48K = 0x16
    AUDIO_96K = 0x17
    AUDIO_192K = 0x18
    ERROR = 0xFF


AUDIO_RATES: Final[dict[int, int]] = {
    Kind.AUDIO_8K: 8000,
    Kind.AUDIO_12K: 12000,
    Kind.AUDIO_16K: 16000,
    Kind.AUDIO_24K: 24000,
    Kind.AUDIO_32K: 32000,
    Kind.AUDIO_44K: 44100,
    Kind.AUDIO_48K: 48000,
    Kind.AUDIO_96K: 96000,
    Kind.AUDIO_192K: 192000,
}
"""Audio kind -> nominal sample rate in Hz (what the label says; 0x10 may carry other
encodings on old Asterisk or the channel driver, which the server's settings decide)."""

_AUDIO_KINDS: Final[dict[int, Kind]] = {int(kind): Kind(kind) for kind in AUDIO_RATES}

_KIND_FOR_RATE: Final[dict[int, int]] = {rate: kind for kind, rate in AUDIO_RATES.items()}

_HEADER: Final = struct.Struct(">BH")
HEADER_SIZE: Final = _HEADER.size  # 3
MAX_PAYLOAD: Final = 0xFFFF
_UUID_SIZE: Final = 16
_DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")


def audio_kind_for_rate(rate: int) -> int:
    """Return the audio kind labelling ``rate`` Hz; ValueError if AudioSocket has none."""
    try:
        return _KIND_FOR_RATE[rate]
    except KeyError:
        supported = ", ".join(str(r) for r in sorted(_KIND_FOR_RATE))
        raise ValueError(
            f"no AudioSocket audio kind for {rate} Hz (supported: {supported})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class CallId:
    """The call's UUID, canonical lowercase text (``str(uuid.UUID(bytes=payload))``)."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Audio:
    """One audio message, payload untouched (normally slin16 LE mono; may be odd or empty)."""

    kind: int
    payload: bytes

    @property
    def sample_rate(self) -> int:
        """Nominal sample rate of the kind; KeyError if ``kind`` is not an audio kind."""
        return AUDIO_RATES[self.kind]


@dataclass(frozen=True, slots=True)
class AudioRun:
    """Consecutive audio messages of one kind, their payloads joined: what
    ``Decoder.next_audio_run`` returns. Not an event of its own; the same messages that
    ``next_event`` would return one by one."""

    kind: int
    payload: bytes
    messages: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A DTMF digit, sent by Asterisk at digit end; always upper case (0-9 * # A-D)."""

    digit: str


@dataclass(frozen=True, slots=True)
class Hangup:
    """The peer asked to end the call (Asterisk itself just closes the socket)."""


@dataclass(frozen=True, slots=True)
class Error:
    """The peer reported an error, with its optional one-byte code."""

    code: int | None


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The stream ended cleanly: EOF on a message boundary, or after Hangup/Error."""


Message: TypeAlias = CallId | Audio | Dtmf | Hangup | Error
"""Events that exist on the wire, i.e. what ``encode`` accepts."""

Event: TypeAlias = CallId | Audio | Dtmf | Hangup | Error | ConnectionClosed


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel: an enum with one member, so it is a true singleton
    (survives copy and pickle) and ``event is NEED_DATA`` narrows types for mypy."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final[Literal[NeedData.NEED_DATA]] = NeedData.NEED_DATA
"""Returned by ``next_event`` when the buffered bytes do not yet hold a complete message."""


class ProtocolError(Exception):
    """The peer broke the AudioSocket protocol. The only exception the decoder raises.

    ``offset`` is the stream offset of the offending message (or byte), when there is one.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Receive buffer


class _ReceiveBuffer:
    """Bytearray plus read offset, so that extracting never copies what is left behind.

    The consumed prefix is dropped when it is at least ``_COMPACT_MIN`` bytes and at least half
    the buffer. Each compaction moves at most as many bytes as were consumed since the last
    one, so the total moved is bounded by the bytes received: linear overall.
    """

    _COMPACT_MIN: Final = 4096  # below this, dropping the prefix is not worth a call

    __slots__ = ("_data", "_start", "bytes_moved")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        self.bytes_moved = 0  # total bytes shifted by compaction; lets tests count the work

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, data: bytes) -> None:
        self._data += data

    def peek_header(self) -> tuple[int, int] | None:
        """(kind, payload length) of the next message, or None if fewer than 3 bytes are in."""
        if len(self._data) - self._start < HEADER_SIZE:
            return None
        kind, length = _HEADER.unpack_from(self._data, self._start)
        return kind, length

    def extract(self, skip: int, count: int) -> bytes:
        """Consume ``skip + count`` bytes and return the last ``count`` (caller checked they are
        there); only the returned bytes are copied."""
        start = self._start + skip
        with memoryview(self._data) as view:  # one copy, not a bytearray slice and then bytes
            out = view[start : start + count].tobytes()
        self._start = start + count
        self._compact()
        return out

    def take_audio_run(self, limit: int) -> AudioRun | None:
        """Consume up to ``limit`` complete audio messages of one kind at the front, stopping at
        a message of another kind or an incomplete one; None if the front is not one. Each
        payload is copied once, into the joined result."""
        data = self._data
        pos = self._start
        end = len(data)
        run_kind = -1
        parts: list[memoryview] = []
        with memoryview(data) as view:
            while end - pos >= HEADER_SIZE and len(parts) < limit:
                kind, length = _HEADER.unpack_from(data, pos)
                if (
                    kind not in AUDIO_RATES
                    or (parts and kind != run_kind)
                    or end - pos - HEADER_SIZE < length
                ):
                    break
                run_kind = kind
                pos += HEADER_SIZE
                parts.append(view[pos : pos + length])
                pos += length
            if not parts:
                return None
            payload = b"".join(parts)
            messages = len(parts)
            parts.clear()  # the slices must go before the view is released
        self._start = pos
        self._compact()
        return AudioRun(_AUDIO_KINDS[run_kind], payload, messages)

    def clear(self) -> None:
        self._data = bytearray()
        self._start = 0

    def _compact(self) -> None:
        start = self._start
        if start == len(self._data):
            self._data.clear()  # fully consumed: nothing to move
            self._start = 0
        elif start >= self._COMPACT_MIN and 2 * start >= len(self._data):
            self.bytes_moved += len(self._data) - start
            del self._data[:start]
            self._start = 0


# ---------------------------------------------------------------------------------------------
# Decoder


class _State(enum.Enum):
    AWAIT_CALL_ID = enum.auto()
    IN_CALL = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


class Decoder:
    """Turns the bytes Asterisk sends into events.

    Feed bytes with ``receive_data`` (``b""`` for EOF), then call ``next_event`` until it returns
    ``NEED_DATA``. Once the stream has ended (ConnectionClosed at EOF, or a Hangup or Error
    message) every further ``next_event`` returns ``ConnectionClosed``, and bytes that still
    arrive are counted in ``bytes_received`` but dropped. After a ``ProtocolError`` the decoder is
    dead: every further ``next_event`` raises a ProtocolError again.
    """

    def __init__(self) -> None:
        self._buffer = _ReceiveBuffer()
        self._state = _State.AWAIT_CALL_ID
        self._eof = False
        self._bytes_received = 0
        self._call_id: str | None = None
        self._error: ProtocolError | None = None

    @property
    def bytes_received(self) -> int:
        """Total bytes fed so far, EOF excluded; offsets in errors count from the same origin."""
        return self._bytes_received

    @property
    def call_id(self) -> str | None:
        """The call's UUID text once the CallId message was decoded, else None."""
        return self._call_id

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` means EOF (repeating it is harmless)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ProtocolError(
                f"received {len(data)} bytes after EOF at byte offset {self._bytes_received}",
                self._bytes_received,
            )
        self._bytes_received += len(data)
        if self._state is _State.CLOSED or self._state is _State.ERROR:
            return  # the call is over: keep nothing, so a chatty peer cannot fill memory
        self._buffer.append(data)

    def next_event(self) -> Event | NeedData:
        """Return the next event, or NEED_DATA if no complete message is buffered."""
        state = self._state
        if state is _State.CLOSED:
            return ConnectionClosed()
        if state is _State.ERROR:
            assert self._error is not None
            raise ProtocolError(f"decoder unusable after earlier error: {self._error}", None)
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._state = _State.ERROR
            self._error = exc
            self._buffer.clear()
            raise

    def next_audio_run(self, limit: int = 64) -> AudioRun | None:
        """In a call, take up to ``limit`` complete audio messages of one kind from the front of
        the buffer at once; None when the next message is not one (then use ``next_event``).

        The fast path for the server: in a call nearly every read is a run of audio, and one
        loop over it costs a fraction of decoding its messages one by one. Interleaved with
        ``next_event``, the same messages come out in the same order, whatever the reads."""
        if self._state is not _State.IN_CALL:
            return None
        return self._buffer.take_audio_run(limit)

    def events(self) -> Iterator[Event]:
        """Yield events until NEED_DATA; the last one yielded is ConnectionClosed if it ended."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event
            if isinstance(event, ConnectionClosed):
                return

    def _next_event(self) -> Event | NeedData:
        buf = self._buffer
        offset = self._bytes_received - len(buf)  # stream offset of the next message
        header = buf.peek_header()
        if header is None:
            if not self._eof:
                return NEED_DATA
            if len(buf):
                raise ProtocolError(
                    f"truncated message at EOF: {len(buf)} of 3 header bytes"
                    f" at byte offset {offset}",
                    offset,
                )
            self._state = _State.CLOSED
            return ConnectionClosed()

        kind, length = header
        self._check_header(kind, length, offset)  # before the payload is in: fail fast
        if len(buf) < HEADER_SIZE + length:
            if not self._eof:
                return NEED_DATA
            raise ProtocolError(
                f"truncated message at EOF: kind 0x{kind:02x} announces {length} payload bytes,"
                f" {len(buf) - HEADER_SIZE} arrived, at byte offset {offset}",
                offset,
            )
        payload = buf.extract(HEADER_SIZE, length)

        audio_kind = _AUDIO_KINDS.get(kind)
        if audio_kind is not None:
            return Audio(audio_kind, payload)
        if kind == Kind.UUID:
            self._call_id = str(uuid.UUID(bytes=payload))
            self._state = _State.IN_CALL
            return CallId(self._call_id)
        if kind == Kind.DTMF:
            return Dtmf(self._dtmf_digit(payload, offset))
        if kind == Kind.HANGUP:
            self._close()
            return Hangup()
        # Kind.ERROR, the only kind left after _check_header
        self._close()
        return Error(payload[0] if payload else None)

    def _check_header(self, kind: int, length: int, offset: int) -> None:
        """Reject a message from its header alone: unknown kind, wrong size, wrong moment."""
        if kind in AUDIO_RATES and self._state is _State.IN_CALL:
            return  # nearly every message: audio in a call, any length
        where = f"at byte offset {offset}"
        if kind in AUDIO_RATES or kind == Kind.DTMF:
            if self._state is _State.AWAIT_CALL_ID:
                name = "audio" if kind in AUDIO_RATES else "DTMF"
                raise ProtocolError(
                    f"{name} message (kind 0x{kind:02x}) before the call id {where}", offset
                )
            if kind == Kind.DTMF and length != 1:
                raise ProtocolError(
                    f"DTMF message with {length}-byte payload, expected 1, {where}", offset
                )
        elif kind == Kind.UUID:
            if self._state is not _State.AWAIT_CALL_ID:
                raise ProtocolError(f"second call id message {where}", offset)
            if length != _UUID_SIZE:
                raise ProtocolError(
                    f"call id message with {length}-byte payload, expected 16, {where}", offset
                )
        elif kind == Kind.HANGUP:
            if length != 0:
                raise ProtocolError(
                    f"hangup message with {length}-byte payload, expected 0, {where}", offset
                )
        elif kind == Kind.ERROR:
            if length > 1:
                raise ProtocolError(
                    f"error message with {length}-byte payload, expected 0 or 1, {where}", offset
                )
        else:
            raise ProtocolError(f"unknown message kind 0x{kind:02x} {where}", offset)

    @staticmethod
    def _dtmf_digit(payload: bytes, offset: int) -> str:
        digit = chr(payload[0]).upper()  # 1 byte, checked in _check_header
        if digit not in _DTMF_DIGITS:
            raise ProtocolError(
                f"invalid DTMF digit {payload!r} (expected 0-9 * # A-D) at byte offset {offset}",
                offset,
            )
        return digit

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._buffer.clear()


# ---------------------------------------------------------------------------------------------
# Encoder


def starts_with_call_id(data: bytes) -> bool:
    """Whether a stream that begins with `data` begins with a complete, well-formed call id
    message: what admission asks of bytes still waiting in a socket, without reading them."""
    if len(data) < HEADER_SIZE + _UUID_SIZE:
        return False
    kind, length = _HEADER.unpack_from(data)
    return bool(kind == Kind.UUID and length == _UUID_SIZE)


def _frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return _HEADER.pack(kind, len(payload)) + payload


def encode(event: Message) -> bytes:
    """Serialise one message (header and payload together, as Asterisk needs them in one write).

    Invalid arguments (not an audio kind, bad digit or UUID, oversize payload) are the caller's
    bug, not the peer's, so they raise ValueError/TypeError rather than ProtocolError.
    """
    if isinstance(event, Audio):
        if event.kind not in AUDIO_RATES:
            raise ValueError(f"kind 0x{event.kind:02x} is not an audio kind")
        return _frame(event.kind, bytes(event.payload))
    if isinstance(event, CallId):
        return _frame(Kind.UUID, uuid.UUID(event.call_id).bytes)
    if isinstance(event, Dtmf):
        digit = event.digit.upper()
        if len(digit) != 1 or digit not in _DTMF_DIGITS:
            raise ValueError(f"invalid DTMF digit {event.digit!r} (expected 0-9 * # A-D)")
        return _frame(Kind.DTMF, digit.encode("ascii"))
    if isinstance(event, Hangup):
        return _frame(Kind.HANGUP, b"")
    if isinstance(event, Error):
        if event.code is None:
            return _frame(Kind.ERROR, b"")
        if not 0 <= event.code <= 0xFF:
            raise ValueError(f"error code {event.code} does not fit in one byte")
        return _frame(Kind.ERROR, bytes((event.code,)))
    raise TypeError(f"cannot encode {event!r}: not an AudioSocket message")
