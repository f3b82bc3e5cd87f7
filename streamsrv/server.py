"""The server: AudioSocket connections in, one Call each, a scheduler tick, a graceful stop.

Connections are asyncio Protocols: each read is fed to the sans-IO decoder and its events to
the Call, synchronously and cheaply, with no task per frame. A scheduler ticks every
STREAMING_INTERVAL: it runs VAD over every call's new audio in one pass on a worker thread,
hands the probabilities back to the calls (which then ask the model for partials and finals),
and closes connections that were silent for TCP_SOCKET_TIMEOUT. The loop never waits on the
model, the disk or the network.

Lifecycle (uvicorn's shape): start() brings up Redis, Postgres, recordings, the model and the
listeners; run() serves until stop() is asked (SIGTERM, SIGINT); then listeners close, open
calls get DRAIN_TIMEOUT to end by themselves, the rest are ended as interrupted, and every
final, recording and job is flushed before exit. A second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import structlog

from streamsrv import audiosocket as aso
from streamsrv.admission import PeerFilter, PendingConnections
from streamsrv.asr.executor import BatchExecutor
from streamsrv.asr.models import resolve_model
from streamsrv.asr.vad import SileroVad, VadState
from streamsrv.asr.whisper import AsrRequest, AsrResult, WhisperRunner
from streamsrv.audio import FloatArray
from streamsrv.call import Call, CallServices
from streamsrv.config import Settings
from streamsrv.http import Health, HttpApi
from streamsrv.jobs import JobStore
from streamsrv.journal import Journal
from streamsrv.metrics import Metrics
from streamsrv.publish import Publisher
from streamsrv.recordings import RecordingWriter
from streamsrv.recovery import recover_open_calls
from streamsrv.spool import CallStore, Spool
from streamsrv.systemd import Notifier

log = structlog.get_logger(__name__)

VAD_BACKLOG_SECONDS = 4.0  # a call's audio waiting for VAD past which its reading pauses
ENDED_IDS_KEPT = 100_000  # call ids remembered so that a reused one is refused
FRAME_SECONDS = 0.02  # Asterisk sends 20 ms frames in steady state
RECORDED_ONLY_READ_SECONDS = 0.5  # audio per wake-up for a call with no live transcription


class Connection(asyncio.Protocol):
    """One AudioSocket TCP connection, and the Call once its id arrives."""

    def __init__(self, server: Server) -> None:
        self.server = server
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
        if self.server.admit(host) is not None:
            self.refuse()
            return
        self.server.connections.add(self)
        self.server.wait_for_call_id(self)

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        self._feed(data)
        call = self.call
        if call is not None and call.vad_backlog_seconds > VAD_BACKLOG_SECONDS and not self.closed:
            # A peer sending faster than real time waits for VAD (TCP flow control) instead
            # of growing memory and pushing speech out of the ring before it is segmented.
            assert self.transport is not None
            self.transport.pause_reading()
            self.server.paused_for_vad.add(self)

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
        self.server.forget(self)
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
            if self.server.call_id_used(event.call_id):
                raise aso.ProtocolError(f"call id {event.call_id} was already used")
            self.call = self.server.open_call(self, event.call_id)
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
        self.server.paused_for_vad.discard(self)
        if self.call is not None:
            self.server.finish_call(self.call, reason)
        elif reason == "lost":  # every other reason was logged where it was found
            log.info("connection_closed", peer=self.peer, reason=reason)

    def end(self, reason: str) -> None:
        self._end(reason)


class Server:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.publisher = Publisher(settings)
        self.store = CallStore(JobStore(settings), Spool(settings.spool_dir))
        self.recorder = RecordingWriter(settings.recordings_dir)
        self.journal = Journal(settings.spool_dir)
        self.connections: set[Connection] = set()
        self.calls: dict[str, Call] = {}
        self.finishing: set[asyncio.Task[None]] = set()
        self.executor: BatchExecutor[AsrRequest, AsrResult] | None = None
        self.model_status = "not loaded" if settings.live_asr else "disabled"
        self.model_name = ""
        self.vad: SileroVad | None = None
        self._vad_pool = ThreadPoolExecutor(1, thread_name_prefix="vad")
        self._vad_pass_running: asyncio.Future[list[tuple[Call, Any]]] | None = None
        self.paused_for_vad: set[Connection] = set()  # reading paused until VAD catches up
        self._ended_ids: dict[str, None] = {}  # recently ended call ids, oldest first
        self._tcp: asyncio.Server | None = None
        self._http = HttpApi(settings, self.health, self.metrics, self.store.jobs)
        self._tick_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._changed = asyncio.Event()  # set when a connection closes or a call finishes
        self.services: CallServices | None = None
        self.accepting = False
        self.notifier = notifier or Notifier(None)
        self._peers = PeerFilter(settings.allowed_peers)
        self.pending: PendingConnections[Connection] = PendingConnections(
            settings.max_pending_connections, settings.max_pending_per_peer
        )
        self._refused: dict[str, int] = {}
        self._last_sweep = 0.0
        self._last_watchdog = 0.0

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.store.start()
        await self.publisher.start()
        self.recorder.start()
        await asyncio.to_thread(self.journal.start)
        await recover_open_calls(self.journal, self.store, self.publisher, self.settings)
        if s.live_asr:
            await self._load_model()
        device = s.device
        self.services = CallServices(
            s,
            self.publisher,
            self.store,
            self.recorder,
            self.metrics,
            self.executor,
            self.journal,
            self.load,
            (s.final_beam(device), s.contextless_final_beam(device)),
        )
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(
            lambda: Connection(self),
            s.audiosocket_host,
            s.audiosocket_port,
            reuse_address=True,
            backlog=1024,
        )
        for sock in self._tcp.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, s.tcp_buffer_size)
        await self._http.start()
        self._tick_task = loop.create_task(self._tick_loop())
        self.accepting = True
        self.notifier.ready(self._status_line())
        log.info(
            "listening",
            audiosocket=f"{s.audiosocket_host}:{self.audiosocket_port}",
            http=f"{s.http_host}:{self.http_port}",
            model=self.model_name or None,
            mode=s.default_processing_mode,
        )

    async def _load_model(self) -> None:
        s = self.settings
        device = s.device
        name = s.realtime_model_name(device)
        self.model_status = "loading"
        path = await asyncio.to_thread(resolve_model, name, s.model_dir)
        runner = await asyncio.to_thread(
            WhisperRunner, path, device, s.realtime_whisper_compute_type, s
        )
        self.vad = await asyncio.to_thread(SileroVad)
        self.executor = BatchExecutor(
            runner.run_batch,
            batch_size=s.batch_size,
            adaptive=s.adaptive_batching,
            min_batch_size=s.min_batch_size,
            max_batch_size=s.max_batch_size,
            max_queue_size=s.max_queue_size,
            workers=s.live_workers(device),
            observer=self.metrics.observe_batch,
        )
        self.executor.start()
        executor = self.executor
        self.metrics.queue_length.set_function(lambda: executor.queued)  # read at each scrape
        self.model_name = f"{name} ({device}, {s.realtime_whisper_compute_type})"
        self.model_status = "ok"
        log.info(
            "model_loaded",
            model=name,
            path=path,
            device=device,
            compute_type=s.realtime_whisper_compute_type,
        )

    async def health(self) -> Health:
        """ok when every part works; degraded when Redis or Postgres is away but calls are
        still taken and recorded; not accepting (503) only when no call can be taken."""
        postgres = await self.store.jobs.check()
        if postgres == "ok" and self.store.spooled:
            postgres = "catching up"  # answering, the spool not yet replayed
        parts = {
            "model": self.model_status,
            "redis": self.publisher.status,
            "postgres": postgres,
            "recordings": self.recordings_status,
        }
        healthy_model = self.model_status in ("ok", "disabled")
        ok = healthy_model and all(v == "ok" for v in parts.values() if v != "disabled")
        body = {
            "status": "ok" if ok else "degraded",
            **parts,
            "model_name": self.model_name,
            "calls_active": len(self.calls),
            "spooled_writes": self.store.spooled,
            "accepting": self.accepting,
        }
        return Health(body, self.accepting)

    @property
    def jobs(self) -> JobStore:
        return self.store.jobs

    @property
    def recordings_status(self) -> str:
        """ok, or the last recording error while no recording has succeeded since."""
        return self.recorder.last_error or "ok"

    @property
    def audiosocket_port(self) -> int:
        assert self._tcp is not None
        return int(self._tcp.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        return self._http.port

    # -- calls ---------------------------------------------------------------------------------

    def call_id_used(self, call_id: str) -> bool:
        """Whether a call with this id is open or ended recently (a reuse is refused)."""
        return call_id in self.calls or call_id in self._ended_ids

    def forget(self, conn: Connection) -> None:
        """A connection closed: drop it, and wake whoever waits for the server to go idle."""
        self.connections.discard(conn)
        self.pending.discard(conn)
        self._changed.set()

    def admit(self, host: str) -> str | None:
        """None when a new connection may proceed, else why it is refused."""
        reason = None
        if not self.accepting:
            reason = "not_accepting"
        elif not self._peers.allows(host):
            reason = "peer_not_allowed"
        if reason is not None:
            self._count_refusal(host, reason)
        return reason

    def wait_for_call_id(self, conn: Connection) -> None:
        """Count a new connection as pending; close the ones it pushes past the limits."""
        now = time.monotonic()
        self._close_pending(self.pending.add(conn, conn.host, now, Connection.call_id_waiting))

    def _close_pending(self, victims: list[Connection]) -> None:
        for victim in victims:
            self.connections.discard(victim)
            victim.refuse()
            self._count_refusal(victim.host, "pending_limit")

    def _count_refusal(self, host: str, reason: str) -> None:
        self.metrics.connections_refused.labels(reason).inc()
        if not self._refused:
            # the first refusal is logged at once, the rest summed up once a second
            log.warning("connection_refused", peer=host, reason=reason)
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def open_call(self, conn: Connection, call_id: str) -> Call | None:
        """The call a connection identified as, or None when MAX_CALLS are open."""
        assert self.services is not None
        self.pending.discard(conn)
        if len(self.calls) >= self.settings.max_calls:
            self._count_refusal(conn.host, "max_calls")
            return None
        call = Call(self.services, call_id, conn.peer)
        self.calls[call_id] = call
        self.metrics.calls_total.inc()
        self.metrics.calls_active.inc()
        return call

    def finish_call(self, call: Call, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(call, reason))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)

    async def _finish(self, call: Call, reason: str) -> None:
        try:
            if self._vad_pass_running is not None:
                # its probabilities for this call must land before the call flushes its VAD
                await asyncio.wait([self._vad_pass_running])
            await call.finish(reason, self._vad_call)
        except Exception:
            log.exception("call_finish_failed", call_id=call.call_id)
        finally:
            self.calls.pop(call.call_id, None)
            self._ended_ids[call.call_id] = None
            if len(self._ended_ids) > ENDED_IDS_KEPT:
                del self._ended_ids[next(iter(self._ended_ids))]
            self._changed.set()
            self.metrics.calls_active.dec()
            self.metrics.calls_ended.labels(reason).inc()

    def load(self) -> float:
        """How saturated the model is: 0 with nothing queued, 1 at MAX_QUEUE_SIZE."""
        if self.executor is None:
            return 0.0
        return min(1.0, self.executor.queued / self.settings.max_queue_size)

    async def _vad_call(self, state: VadState, audio: FloatArray) -> Any:
        assert self.vad is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._vad_pool, self.vad.run, state, audio)

    # -- scheduler -----------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.settings.streaming_interval
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            self.metrics.loop_lag_seconds.observe(max(0.0, now - next_at))
            if now - next_at > interval:
                next_at = now  # fell behind: do not tick in a burst to catch up
            try:
                self._tick(now)
            except Exception:
                log.exception("tick_failed")

    def _tick(self, now: float) -> None:
        self.recorder.hand_over()
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            self._sweep(now)
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self._last_watchdog >= interval:
            # sent from the loop itself: a stuck loop stops the pings and systemd restarts us
            self._last_watchdog = now
            self.notifier.watchdog()
            self.notifier.status(self._status_line())
        if self.vad is None or self._vad_pass_running is not None:
            return
        work = []
        for call in self.calls.values():
            if call.ended:
                continue
            taken = call.take_vad_audio()
            if taken is not None:
                work.append((call, *taken))
        if work:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._vad_pool, self._vad_pass, work)
            future.add_done_callback(self._vad_done)
            self._vad_pass_running = future

    def _sweep(self, now: float) -> None:
        """Once a second: dead sockets, silent handshakes, overlong calls, refusal counts."""
        s = self.settings
        for conn in list(self.connections):
            call_id = conn.decoder.call_id
            if conn.burst_seconds and now - conn.last_data > 2 * conn.burst_seconds:
                conn.read_every_byte()  # a gap: what is waiting in the socket is read now
            if now - conn.last_data > s.tcp_socket_timeout:
                log.warning("socket_timeout", peer=conn.peer, call_id=call_id)
                conn.end("timeout")
            elif conn.call is None and now - conn.opened > s.call_id_timeout:
                log.warning("no_call_id", peer=conn.peer, seconds=s.call_id_timeout)
                conn.end("no_call_id")
            elif conn.call is not None and now - conn.opened > s.max_call_seconds:
                log.warning("max_call_seconds", call_id=call_id, seconds=s.max_call_seconds)
                conn.end("max_duration")
        self._close_pending(self.pending.enforce(now, Connection.call_id_waiting))
        if self._refused:
            log.warning("connections_refused", **self._refused)
            self._refused = {}

    def _status_line(self) -> str:
        queued = self.executor.queued if self.executor is not None else 0
        return f"{len(self.calls)} calls active, {queued} windows queued"

    def _vad_pass(self, work: list[tuple[Call, VadState, FloatArray]]) -> list[tuple[Call, Any]]:
        assert self.vad is not None
        return [(call, self.vad.run(state, audio)) for call, state, audio in work]

    def _vad_done(self, future: asyncio.Future[list[tuple[Call, Any]]]) -> None:
        self._vad_pass_running = None
        for conn in list(self.paused_for_vad):
            if conn.call is None or conn.call.vad_backlog_seconds < VAD_BACKLOG_SECONDS / 2:
                self.paused_for_vad.discard(conn)
                if not conn.closed and conn.transport is not None:
                    conn.transport.resume_reading()
        if future.exception() is not None:
            log.error("vad_failed", error=repr(future.exception()))
            return
        for call, probs in future.result():
            if not call.ended:
                call.on_vad(np.asarray(probs).tolist())

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Signal handler: the first asks for a graceful drain, the second forces the end."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until stop(); whatever start() opened is closed, even when start() or the
        drain fails. SIGTERM and SIGINT call stop() when `handle_signals` (the CLI's case)."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            await self._stop.wait()
            await self.drain()
        finally:
            await self.close()
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def wait_idle(self) -> None:
        """Until no connection is open and every call has finished."""
        while self.connections or self.calls:
            self._changed.clear()
            await self._changed.wait()

    async def drain(self) -> None:
        log.info("draining", calls=len(self.calls), timeout=self.settings.drain_timeout)
        self.notifier.stopping()
        self.accepting = False
        if self._tcp is not None:
            self._tcp.close()
        deadline = self.settings.drain_timeout

        force = asyncio.ensure_future(self._force.wait())
        gone = asyncio.ensure_future(self.wait_idle())
        await asyncio.wait([gone, force], timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        gone.cancel()
        for conn in list(self.connections):
            conn.end("shutdown")
        while self.finishing:
            await asyncio.gather(*self.finishing, return_exceptions=True)

    async def close(self) -> None:
        """Close what start() opened, in reverse; safe after a start() that failed midway."""
        self.accepting = False
        if self._tcp is not None:
            self._tcp.close()
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        await self._http.close()
        if self.executor is not None:
            await self.executor.close()
        self._vad_pool.shutdown(wait=True)
        await self.recorder.close()
        await self.journal.close()
        await self.publisher.close(timeout=5.0)
        await self.store.close()
        self.notifier.close()
        log.info("stopped")
