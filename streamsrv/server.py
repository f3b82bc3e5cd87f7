"""The server: AudioSocket connections in, one Call each, a scheduler tick, a graceful stop.

Connections (streamsrv.connection) see the server as their CallHost: admission, the call an
id opens, the VAD scheduler, and where an ended call goes. A scheduler ticks every
STREAMING_INTERVAL: it starts a VAD pass over every call's new audio (streamsrv.vad_scheduler)
and, once a second, closes connections that were silent for TCP_SOCKET_TIMEOUT or never sent
their call id. The loop never waits on the model, the disk or the network.

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

import structlog

from streamsrv import audiosocket as aso
from streamsrv.admission import Admission
from streamsrv.asr.executor import BatchExecutor
from streamsrv.asr.live_model import load_live_model
from streamsrv.asr.vad import SileroVad
from streamsrv.asr.whisper import AsrRequest, AsrResult
from streamsrv.call import Call, CallServices
from streamsrv.config import Settings
from streamsrv.connection import Connection
from streamsrv.context_desk import ContextDesk
from streamsrv.conversation import ConversationHub
from streamsrv.http import Health, HttpApi
from streamsrv.jobs import JobStore
from streamsrv.journal import Journal
from streamsrv.metrics import Metrics
from streamsrv.publish import Publisher
from streamsrv.queue_watch import QueueWatch
from streamsrv.recordings import RecordingWriter
from streamsrv.recovery import recover_open_calls
from streamsrv.spool import CallStore, Spool
from streamsrv.systemd import Notifier
from streamsrv.ticker import tick_every
from streamsrv.vad_scheduler import VadScheduler

log = structlog.get_logger(__name__)

ENDED_IDS_KEPT = 100_000  # call ids remembered so that a reused one is refused


class Server:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.publisher = Publisher(settings)
        self.store = CallStore(JobStore(settings), Spool(settings.spool_dir))
        self.recorder = RecordingWriter(settings.recordings_dir)
        self.journal = Journal(settings.spool_dir)
        self.queue_watch = QueueWatch(self.store.jobs.jobs.overview)
        self.metrics.redis_up.set_function(lambda: self.publisher.status == "ok")
        self.metrics.postgres_up.set_function(lambda: self.store.status == "ok")
        self.metrics.spooled_writes.set_function(lambda: self.store.spooled)
        self.connections: set[Connection] = set()
        self.calls: dict[str, Call] = {}
        self.finishing: set[asyncio.Task[None]] = set()
        self.executor: BatchExecutor[AsrRequest, AsrResult] | None = None
        self.model_status = "not loaded" if settings.live_asr else "disabled"
        self.model_name = ""
        self.vad: SileroVad | None = None
        self.vad_scheduler = VadScheduler()
        self._ended_ids: dict[str, None] = {}  # recently ended call ids, oldest first
        self._tcp: asyncio.Server | None = None
        self.contexts = ContextDesk(
            settings, self.calls.get, self._ended_ids.__contains__, self.store.jobs.calls,
            self.publisher,
        )  # fmt: skip
        self._http = HttpApi(settings, self.health, self.metrics, self.store.jobs, self.contexts)
        self._tick_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._changed = asyncio.Event()  # set when a connection closes or a call finishes
        self.services: CallServices | None = None
        self.accepting = False
        self.notifier = notifier or Notifier(None)
        self.admission: Admission[Connection] = Admission(settings, self.metrics)
        self._last_sweep = 0.0
        self._last_watchdog = 0.0

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.store.start()
        self.queue_watch.start()
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
            ConversationHub(self.publisher.publish_conversation),
            self.contexts.english_only,
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
        self._tick_task = loop.create_task(
            tick_every(s.streaming_interval, self._tick, self.metrics.loop_lag_seconds)
        )
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
        self.model_status = "loading"
        model = await load_live_model(self.settings, self.metrics)
        self.executor, self.model_name = model.executor, model.name
        self.contexts.english_only = model.english_only
        self.vad = self.vad_scheduler.vad = model.vad
        self.model_status = "ok"

    async def health(self) -> Health:
        return Health.report(
            model=self.model_status,
            model_name=self.model_name,
            redis=self.publisher.status,
            postgres=await self.store.jobs.check(),
            spooled=self.store.spooled,
            recordings=self.recordings_status,
            calls_active=len(self.calls),
            accepting=self.accepting,
            queue=self.queue_watch.counts(),
        )

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

    def closed(self, conn: Connection) -> None:
        """A connection closed: drop it, and wake whoever waits for the server to go idle."""
        self.connections.discard(conn)
        self.admission.closed(conn)
        self._changed.set()

    def admit(self, conn: Connection) -> bool:
        if not self.admission.admit(conn, self.accepting):
            return False
        self.connections.add(conn)
        return True

    def identified(self, conn: Connection, call_id: str) -> Call | None:
        """The call a connection identified as, or None when MAX_CALLS are open."""
        assert self.services is not None
        if self.call_id_used(call_id):
            raise aso.ProtocolError(f"call id {call_id} was already used")
        if not self.admission.identified(conn, len(self.calls)):
            return None
        held = self.contexts.take(call_id)
        call = Call(self.services, call_id, conn.peer, held)
        self.calls[call_id] = call
        self.metrics.calls_total.inc()
        self.metrics.calls_active.inc()
        return call

    def finish(self, call: Call, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(call, reason))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)

    async def _finish(self, call: Call, reason: str) -> None:
        try:
            # the pass in flight hands this call its probabilities before it flushes VAD
            await self.vad_scheduler.settled()
            await call.finish(reason, self.vad_scheduler.run_one)
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

    # -- scheduler -----------------------------------------------------------------------------

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
        self.vad_scheduler.tick(self.calls.values())

    def _sweep(self, now: float) -> None:
        """Once a second: dead sockets, silent handshakes, overlong calls, refusal counts."""
        for conn in list(self.connections):
            conn.sweep(now)
        self.admission.sweep(now)

    def _status_line(self) -> str:
        queued = self.executor.queued if self.executor is not None else 0
        return f"{len(self.calls)} calls active, {queued} windows queued"

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
        self.vad_scheduler.close()
        await self.recorder.close()
        await self.journal.close()
        await self.publisher.close(timeout=5.0)
        await self.queue_watch.close()
        await self.store.close()
        self.notifier.close()
        log.info("stopped")
