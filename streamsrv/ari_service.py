"""`streamsrv ari`: follows Asterisk's ARI events and carries out streamsrv.ari_watch's decisions.

The watched call comes first: it is sent on in the dialplan before anything is made for it, and
whatever fails later (a snoop, a bridge, streamsrv's HTTP) is logged and torn down, never the
call itself. Each decision runs as its own task, so the event stream is never held up by a
slow request; a teardown waits for its watch's setup to finish, so nothing made late leaks.

The WebSocket is reconnected with a short capped back-off (Asterisk restarting); on each
connection the watches whose channel vanished meanwhile are torn down. SIGTERM or SIGINT tears
down every watch (the calls go on, untranscribed) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import structlog

from streamsrv.ari_client import AriClient, AriError, backoff
from streamsrv.ari_metrics import AriMetrics
from streamsrv.ari_watch import (
    Channel,
    Connected,
    Continue,
    Entered,
    Leg,
    Unwatch,
    Variables,
    Watch,
    WatchConfig,
    Watches,
    leg_context,
    sort_leftovers,
)
from streamsrv.config import Settings
from streamsrv.metrics_endpoint import MetricsEndpoint

log = structlog.get_logger(__name__)

FAILURES = (AriError, aiohttp.ClientError, OSError, TimeoutError)
STOP_SECONDS = 10.0  # the most a stop waits for teardowns
ENTER_SECONDS = 5.0  # the most a new channel of ours may take to enter the app
LINKEDID = "CHANNEL(linkedid)"


class AriService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = WatchConfig.from_settings(settings)
        self.watches = Watches(settings.ari_app)
        self._setups: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._entering: dict[str, asyncio.Future[None]] = {}  # our channels not yet in the app
        self.metrics = AriMetrics(lambda: len(self.watches))
        self.endpoint: MetricsEndpoint | None = None  # with ARI_METRICS_PORT

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        s = self.settings
        async with (
            AriClient.session(s.ari_user, s.ari_password) as ari_session,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        ):
            self.ari = AriClient(ari_session, s.ari_url, s.ari_app)
            self.http = http
            log.info(
                "ari_starting",
                ari=s.ari_url,
                app=s.ari_app,
                audiosocket=self.config.audiosocket_address,
                streamsrv=self.config.streamsrv_url,
            )
            await self._serve_metrics()
            follower = asyncio.create_task(self._follow())
            await stop.wait()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            log.info("ari_stopping", watches=len(self.watches))
            for channel_id in self.watches.watched():
                unwatch = self.watches.forget(channel_id, "stopping")
                if unwatch is not None:
                    self._spawn(self._unwatch(unwatch))
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=STOP_SECONDS)
            if self.endpoint is not None:
                await self.endpoint.close()
        log.info("ari_stopped")

    async def _serve_metrics(self) -> None:
        s = self.settings
        if not s.ari_metrics_port:
            return
        self.endpoint = MetricsEndpoint(self.metrics.registry, "ARI_METRICS_PORT")
        await self.endpoint.start(s.ari_metrics_host, s.ari_metrics_port)
        log.info("ari_metrics_listening", host=s.ari_metrics_host, port=self.endpoint.port)

    async def _follow(self) -> None:
        attempt = failures = 0
        while True:
            connected = False
            try:
                async with self.ari.events() as events:
                    log.info("ari_connected", ari=self.settings.ari_url, app=self.ari.app)
                    connected, attempt, failures = True, 0, 0
                    self.metrics.connected.set(1)
                    self.metrics.connections.inc()
                    self._spawn(self._sweep())
                    async for event in events:
                        self._dispatch(event, time.monotonic())
                self.metrics.connected.set(0)
                log.warning("ari_disconnected")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.metrics.connected.set(0)
                if connected:  # the stream broke rather than closed
                    log.warning("ari_disconnected", error=repr(exc))
                else:
                    failures += 1
                    if failures % 12 == 1:  # the first failure, then about once a minute
                        log.warning("ari_unreachable", error=repr(exc), failures=failures)
            attempt += 1
            await asyncio.sleep(backoff(attempt))

    def _dispatch(self, event: dict[str, Any], received: float) -> None:
        decision = self.watches.on_event(event)
        if isinstance(decision, Watch):
            task = self._spawn(self._watch(decision, received))
            self._setups[decision.channel.id] = task
        elif isinstance(decision, Entered):
            entering = self._entering.get(decision.channel_id)
            if entering is not None and not entering.done():
                entering.set_result(None)
        elif isinstance(decision, Continue):
            self._spawn(self._continue(decision.channel_id))
        elif isinstance(decision, Connected):
            for leg in decision.legs:
                self._spawn(self._post_context(leg, {"agent": decision.agent}))
        elif isinstance(decision, Unwatch):
            self._spawn(self._unwatch(decision))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _continue(self, channel_id: str) -> bool:
        try:
            await self.ari.continue_in_dialplan(channel_id)
        except FAILURES as exc:
            log.warning("ari_continue_failed", channel_id=channel_id, error=str(exc))
            return False
        return True

    async def _watch(self, watch: Watch, received: float) -> None:
        channel = watch.channel
        if not await self._continue(channel.id):
            self.metrics.watches.labels("not_continued").inc()
            self.watches.forget(channel.id, "not continued")  # nothing was made yet
            self._setups.pop(channel.id, None)
            return
        continued_ms = (time.monotonic() - received) * 1000
        try:
            await self.ari.subscribe_channel(channel.id)  # its hangup, now it left Stasis
            # read after subscribing: a connected line set before is in it, one after comes
            # as ChannelConnectedLine
            linkedid, language, queue, now = await asyncio.gather(
                self.ari.variable(channel.id, LINKEDID),
                self.ari.variable(channel.id, self.config.language_variable),
                self.ari.variable(channel.id, self.config.queue_variable),
                self.ari.channel(channel.id),
            )
            channel = Channel.from_event(now)
            variables = Variables(linkedid, language, queue)
            results = await asyncio.gather(
                *(self._leg(channel, leg, variables) for leg in watch.legs),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except FAILURES as exc:
            log.warning("ari_watch_failed", channel=channel.name, error=str(exc))
            self.metrics.watches.labels("failed").inc()
            unwatch = self.watches.forget(channel.id, "setup failed")
            if unwatch is not None:
                await self._teardown(unwatch)
            return
        setup_seconds = time.monotonic() - received
        self.metrics.watches.labels("watching").inc()
        self.metrics.setup_seconds.observe(setup_seconds)
        log.info(
            "ari_watching",
            channel=channel.name,
            channel_id=channel.id,
            conversation=variables.linkedid,
            language=variables.language,
            queue=variables.queue,
            legs={leg.role: leg.call_id for leg in watch.legs},
            continued_ms=round(continued_ms, 1),
            setup_ms=round(setup_seconds * 1000, 1),
        )

    async def _leg(self, channel: Channel, leg: Leg, variables: Variables) -> None:
        await self._post_context(leg, leg_context(leg, channel, variables))
        loop = asyncio.get_running_loop()
        ours = (leg.snoop_id, leg.media_id)
        entered = [self._entering.setdefault(i, loop.create_future()) for i in ours]
        try:
            made = await asyncio.gather(
                self.ari.create_bridge(leg.bridge_id),
                self.ari.snoop(channel.id, leg.snoop_id, leg.spy),
                self.ari.external_media_audiosocket(
                    leg.media_id, self.config.audiosocket_address, leg.call_id
                ),
                return_exceptions=True,
            )
            for result in made:
                if isinstance(result, BaseException):
                    raise result
            await asyncio.wait_for(asyncio.gather(*entered), ENTER_SECONDS)
        finally:
            for i in ours:
                self._entering.pop(i, None)
        await self.ari.add_to_bridge(leg.bridge_id, *ours)

    async def _post_context(self, leg: Leg, context: dict[str, Any]) -> None:
        """The leg's context, before its audio connects. A refusal is logged and the leg goes
        on without it; a language the live model refuses (422) is dropped and posted again."""
        url = f"{self.config.streamsrv_url}/calls/{leg.call_id}/context"
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        try:
            async with self.http.post(url, json=context, headers=headers) as response:
                status, text = response.status, await response.text()
            if status == 422 and "language" in context:
                log.warning("ari_context_language_refused", call_id=leg.call_id, error=text)
                without = {k: v for k, v in context.items() if k != "language"}
                async with self.http.post(url, json=without, headers=headers) as response:
                    status, text = response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("ari_context_failed", call_id=leg.call_id, error=repr(exc))
            self.metrics.context_failures.inc()
            return
        if status >= 300:
            self.metrics.context_failures.inc()
            log.warning("ari_context_refused", call_id=leg.call_id, status=status, error=text)

    async def _unwatch(self, unwatch: Unwatch) -> None:
        setup = self._setups.pop(unwatch.channel_id, None)
        if setup is not None and setup is not asyncio.current_task():
            await asyncio.wait([setup])  # nothing is made after the teardown
        await self._teardown(unwatch)

    async def _teardown(self, unwatch: Unwatch) -> None:
        self._setups.pop(unwatch.channel_id, None)
        steps = []
        for leg in unwatch.legs:
            steps += [
                self.ari.hangup(leg.media_id),
                self.ari.hangup(leg.snoop_id),
                self.ari.destroy_bridge(leg.bridge_id),
            ]
        results = await asyncio.gather(*steps, return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        log.info(
            "ari_unwatched", channel_id=unwatch.channel_id, why=unwatch.why, errors=errors or None
        )

    async def _sweep(self) -> None:
        """After a (re)connection: end the watches whose channel is gone (events were missed),
        then take over or remove what an earlier run left (streamsrv.ari_watch.sort_leftovers)."""
        for channel_id in self.watches.watched():
            try:
                alive = await self.ari.channel_exists(channel_id)
            except FAILURES:
                continue
            if not alive:
                unwatch = self.watches.forget(channel_id, "gone while disconnected")
                if unwatch is not None:
                    self._spawn(self._unwatch(unwatch))
        try:
            channels, bridges = await asyncio.gather(self.ari.channels(), self.ari.bridges())
        except FAILURES as exc:
            log.warning("ari_leftovers_unread", error=str(exc))
            return
        left = sort_leftovers(self.ari.app, channels, bridges, self.watches.known())
        for channel_id, legs in left.adopt.items():
            if self.watches.adopt(channel_id, legs):
                self._spawn(self._adopt(channel_id, legs))
        if left.channels or left.bridges:
            steps = [self.ari.hangup(i) for i in left.channels]
            steps += [self.ari.destroy_bridge(i) for i in left.bridges]
            results = await asyncio.gather(*steps, return_exceptions=True)
            errors = [str(r) for r in results if isinstance(r, BaseException)]
            self.metrics.leftovers_removed.inc(len(steps) - len(errors))
            log.info(
                "ari_leftovers_removed",
                channels=left.channels,
                bridges=left.bridges,
                errors=errors or None,
            )

    async def _adopt(self, channel_id: str, legs: tuple[Leg, ...]) -> None:
        """Watch on a channel an earlier run set up: its hangup must reach this run."""
        try:
            await self.ari.subscribe_channel(channel_id)
        except FAILURES as exc:  # gone in between: its legs go
            unwatch = self.watches.forget(channel_id, f"not adopted: {exc}")
            if unwatch is not None:
                await self._teardown(unwatch)
            return
        self.metrics.adopted.inc()
        log.info("ari_adopted", channel_id=channel_id, legs={leg.role: leg.call_id for leg in legs})
