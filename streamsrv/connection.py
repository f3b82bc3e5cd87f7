"""One AudioSocket connection: bytes in through the sans-IO decoder, a Call once its id
arrives. Connections are asyncio Protocols: each read is decoded and handed to the call
synchronously and cheaply, with no task per frame.

A connection sees the server only through CallHost: admission, the call its id names, the VAD
scheduler's back-pressure, and where to hand a call that ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Protocol, cast

import structlog

from streamsrv import audiosocket as aso
from streamsrv.call import Call
from streamsrv.config import Settings
from streamsrv.metrics import Metrics
from streamsrv.vad_scheduler import VadScheduler

log = structlog.get_logger(__name__)

FRAME_SECONDS = 0.02  # Asterisk sends 20 ms frames in steady state
RECORDED_ONLY_READ_SECONDS = 0.5  # audio per wake-up for a call with no live transcription


class CallHost(Protocol):
    """What a connection needs of the server."""

    settings: Settings
    metrics: Metrics
    vad_scheduler: VadScheduler

    def admit(self, conn: Connection) -> bool:
        """Whether a new connection is served (it then waits for its call id)."""

    def identified(self, conn: Connection, call_id: str) -> Call | None:
        """The call a connection's id opens; None: refused (MAX_CALLS). Raises ProtocolError
        for an id already used."""

    def closed(self, conn: Connection) -> None:
        """The connection is gone."""

    def finish(self, call: Call, reason: str) -> None:
        """End the call in the background."""


class Connection(asyncio.Protocol):
    """One AudioSocket TCP connection, and the Call once its id arrives."""

    def __init__(self, host: CallHost) -> None:
        self.server = host
        self.decoder = aso.Decoder()
        self.transport: asyncio.Transport | None = None
        self.host = self.peer = ""
        self.call: Call | None = None
        self.last_data = self.opened = time.monotonic()
        self.closed = False
        self.burst_seconds = 0.0  # audio a read waits for; 0 until the call's audio flows

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.host = host = str(peer[0]) if isinstance(peer, tuple) else ""
        self.peer = f"{host}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.server.admit(self):
            self.refuse()

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        self._feed(data)
        self.server.vad_scheduler.hold_back(self)  # a peer faster than real time waits for VAD

    def pause_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def refuse(self) -> None:
        """Close at once, before any call exists: nothing to finish, nothing to log here."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def call_id_waiting(self) -> bool:
        """Whether this connection's first message, a complete call id, is in its socket
        unread: it is a call that the next read will identify. Peeks; reads nothing."""
        if self.call is not None or self.closed or self.decoder.bytes_received:
            return False
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        peek = socket.socket(fileno=sock.fileno())  # uvloop hands out a pseudo-socket
        try:
            waiting = peek.recv(aso.HEADER_SIZE + 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            waiting = b""
        finally:
            peek.detach()  # the transport still owns the descriptor
        return aso.starts_with_call_id(waiting)

    def eof_received(self) -> bool:
        self._feed(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed(self)
        if not self.closed:
            # a reset is how Asterisk sometimes hangs up: a normal end
            self._end("hangup" if exc is None or isinstance(exc, ConnectionError) else "lost")

    def _feed(self, data: bytes) -> None:
        """Decode a read. Its runs of audio reach the call whole (a read holds several frames):
        conversion, recording and metrics once a run, not once a 20 ms frame."""
        if self.closed:
            return
        decoder = self.decoder
        try:
            decoder.receive_data(data)
            while not self.closed:
                run = decoder.next_audio_run()
                if run is not None:
                    self._on_audio(run)
                    continue
                event = decoder.next_event()
                if event is aso.NEED_DATA:
                    return
                self._on_event(event)
        except aso.ProtocolError as exc:
            self.server.metrics.protocol_errors.inc()
            log.warning(
                "protocol_error", peer=self.peer, call_id=self.decoder.call_id, error=str(exc)
            )
            self._end("protocol_error")

    def _on_audio(self, run: aso.AudioRun) -> None:
        metrics = self.server.metrics
        metrics.frames_received.inc(run.messages)
        metrics.bytes_received.inc(len(run.payload))
        if self.call is not None:
            self.call.on_audio(run.kind, run.payload, run.messages)
            if not self.burst_seconds:
                self._read_in_bursts(self.call, run)

    def _on_event(self, event: aso.Event) -> None:
        # never audio: next_audio_run takes every complete audio message first
        if isinstance(event, aso.CallId):
            self.call = self.server.identified(self, event.call_id)
            if self.call is None:
                self.refuse()
        elif isinstance(event, aso.Dtmf):
            if self.call is not None:
                self.call.on_dtmf(event)
        elif isinstance(event, aso.Hangup):
            self._end("hangup")
        elif isinstance(event, aso.Error):
            self._end("asterisk_error")
        elif isinstance(event, aso.ConnectionClosed):
            self._end("hangup")

    def _read_in_bursts(self, call: Call, run: aso.AudioRun) -> None:
        """Once the call's audio flows, wake for a burst of frames, not for every 20 ms one:
        at hundreds of calls the wake-ups and reads are most of what taking calls costs.

        A live call gets one scheduler tick of audio a wake-up (5 frames at 100 ms), as that
        is how often its audio is looked at. A call that is only recorded gets half a second
        (25 frames): the ingest benchmark's CPU per audio second at 300 calls went from 0.47
        ms (5 frames) to 0.25 ms. EOF and resets still wake at once; a DTMF key or a bad
        message waits for the frames after it; if none come (a media gap), the sweep goes back
        to reading every byte (read_every_byte)."""
        seconds = (
            self.server.settings.streaming_interval
            if call.transcribing_live
            else RECORDED_ONLY_READ_SECONDS
        )
        frames = max(1, round(seconds / FRAME_SECONDS))
        self._set_low_water(frames * (aso.HEADER_SIZE + len(run.payload) // run.messages))
        self.burst_seconds = seconds

    def sweep(self, now: float) -> None:
        """Once a second: a media gap, a dead socket, a silent handshake, an overlong call."""
        s = self.server.settings
        call_id = self.decoder.call_id
        if self.burst_seconds and now - self.last_data > 2 * self.burst_seconds:
            self.read_every_byte()  # a gap: what is waiting in the socket is read now
        if now - self.last_data > s.tcp_socket_timeout:
            log.warning("socket_timeout", peer=self.peer, call_id=call_id)
            self._end("timeout")
        elif self.call is None and now - self.opened > s.call_id_timeout:
            log.warning("no_call_id", peer=self.peer, seconds=s.call_id_timeout)
            self._end("no_call_id")
        elif self.call is not None and now - self.opened > s.max_call_seconds:
            log.warning("max_call_seconds", call_id=call_id, seconds=s.max_call_seconds)
            self._end("max_duration")

    def read_every_byte(self) -> None:
        """Wake for any byte again, so that what waits below the burst size (a key pressed in a
        media gap, the audio before a timeout) is read; the next audio re-arms the bursts."""
        self._set_low_water(1)
        self.burst_seconds = 0.0

    def _set_low_water(self, size: int) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self.closed:
            with contextlib.suppress(OSError):  # a socket the peer just reset: nothing to tune
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)

    def _end(self, reason: str) -> None:
        """End the connection and, if a call was open, finish it in the background."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.server.vad_scheduler.forget(self)
        if self.call is not None:
            self.server.finish(self.call, reason)
        elif reason == "lost":  # every other reason was logged where it was found
            log.info("connection_closed", peer=self.peer, reason=reason)

    def end(self, reason: str) -> None:
        self._end(reason)
