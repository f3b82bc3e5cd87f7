"""HTTP on HTTP_HOST:HTTP_PORT (aiohttp, on the server's loop): GET /health, GET /metrics,
POST /audio/process (a recording for the post-call pass), GET /calls/<id>, POST
/calls/<id>/context, GET /conversations/<id>, GET /queue, and the live board: GET / and
GET /events (streamsrv.http_board). Who may use which: streamsrv.http_access.

It sees the server through what it serves, not the server itself: a health() coroutine, the
metrics and the job store."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from streamsrv.config import Settings
from streamsrv.http_access import access_guard
from streamsrv.http_board import EventsEndpoint, serve_board_file
from streamsrv.http_context import ContextSink, post_context
from streamsrv.jobs import JobStore, bounded
from streamsrv.metrics import Metrics
from streamsrv.postcall import uploads

log = structlog.get_logger(__name__)

QUEUE_READ_TIMEOUT = 3.0  # GET /queue answers 503 rather than wait longer on Postgres


@dataclass(frozen=True, slots=True)
class Health:
    """What /health answers: its JSON, and whether calls are taken (200, else 503)."""

    body: dict[str, Any]
    accepting: bool

    @classmethod
    def report(
        cls,
        *,
        model: str,
        model_name: str,
        redis: str,
        postgres: str,
        spooled: int,
        recordings: str,
        calls_active: int,
        accepting: bool,
        queue: dict[str, int] | str,
    ) -> Health:
        """ok when every part works; degraded when Redis or Postgres is away but calls are
        still taken and recorded; not accepting (503) only when no call can be taken. `queue`:
        the post-call queue's counts as last read, or "unavailable"."""
        if postgres == "ok" and spooled:
            postgres = "catching up"  # answering, the spool not yet replayed
        parts = {"model": model, "redis": redis, "postgres": postgres, "recordings": recordings}
        healthy_model = model in ("ok", "disabled")
        ok = healthy_model and all(v == "ok" for v in parts.values() if v != "disabled")
        body = {
            "status": "ok" if ok else "degraded",
            **parts,
            "model_name": model_name,
            "calls_active": calls_active,
            "spooled_writes": spooled,
            "accepting": accepting,
            "queue": queue,
        }
        return cls(body, accepting)


class HttpApi:
    def __init__(
        self,
        settings: Settings,
        health: Callable[[], Awaitable[Health]],
        metrics: Metrics,
        jobs: JobStore,
        contexts: ContextSink,
    ) -> None:
        self.settings = settings
        self._health = health
        self._metrics = metrics
        self._jobs = jobs
        self._contexts = contexts
        self._events = EventsEndpoint(settings)
        self.app = web.Application(middlewares=[access_guard(settings)])
        self.app.router.add_get("/", serve_board_file)
        self.app.router.add_get("/board/{name}", serve_board_file)
        self.app.router.add_get("/events", self._events.stream)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/audio/process", self.process_audio)
        self.app.router.add_get("/calls/{call_id}", self.get_call)
        self.app.router.add_post("/calls/{call_id}/context", self.post_context)
        self.app.router.add_get("/conversations/{conversation}", self.get_conversation)
        self.app.router.add_get("/queue", self.get_queue)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        settings = self.settings
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, settings.http_host, settings.http_port)
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("HTTP is not listening")

    async def close(self) -> None:
        await self._events.close()  # open event streams end first, or cleanup waits on them
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        health = await self._health()
        return web.json_response(health.body, status=200 if health.accepting else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def process_audio(self, request: web.Request) -> web.Response:
        """A recording that did not come over AudioSocket: stored, queued, 202."""
        return await uploads.handle_upload(request, self.settings, self._jobs)

    async def post_context(self, request: web.Request) -> web.Response:
        """Who the call is (streamsrv.http_context): held until it connects, or applied."""
        return await post_context(request, self._contexts)

    async def get_conversation(self, request: web.Request) -> web.Response:
        """Both legs (their rows) and the merged transcript of a conversation."""
        conversation = request.match_info["conversation"]
        return await _view(
            self._contexts.conversation_view(conversation),
            "no such conversation",
            "conversation_view_failed",
            conversation=conversation,
        )

    async def get_queue(self, request: web.Request) -> web.Response:
        """The post-call queue at a glance (JobRepository.overview), read now."""

        async def read() -> dict[str, Any]:
            overview = await bounded(self._jobs.jobs.overview(), QUEUE_READ_TIMEOUT)
            return overview.to_json()

        return await _view(read(), "", "queue_view_failed")

    async def get_call(self, request: web.Request) -> web.Response:
        """The call row, its live transcript, its job and its post-call results."""
        try:
            call_id = str(uuid.UUID(request.match_info["call_id"]))
        except ValueError:
            return uploads.error_response(404, "no such call")
        return await _view(
            self._jobs.calls.view(call_id), "no such call", "call_view_failed", call_id=call_id
        )


async def _view(
    fetch: Awaitable[dict[str, Any] | None], missing: str, failed: str, **about: str
) -> web.Response:
    """A view read from Postgres as JSON: 404 when there is none, 503 when Postgres is away
    (said, not raised into aiohttp)."""
    try:
        view = await fetch
    except Exception as exc:
        log.warning(failed, error=repr(exc), **about)
        return uploads.error_response(503, "database unavailable")
    if view is None:
        return uploads.error_response(404, missing)
    return web.json_response(view)
