"""HTTP on HTTP_HOST:HTTP_PORT (aiohttp, on the server's loop): GET /health, GET /metrics,
POST /audio/process (a recording for the post-call pass) and GET /calls/<id>."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from streamsrv.postcall import uploads

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from streamsrv.server import Server


class HttpApi:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/audio/process", self.process_audio)
        self.app.router.add_get("/calls/{call_id}", self.get_call)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        settings = self.server.settings
        self._runner = web.AppRunner(self.app, access_log=None)
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
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        """ok when every part works; degraded when Redis or Postgres is away but calls are
        still taken and recorded; 503 only when no call can be taken."""
        server = self.server
        postgres = await server.store.jobs.check()
        if postgres == "ok" and server.store.spooled:
            postgres = "catching up"  # answering, the spool not yet replayed
        parts = {
            "model": server.model_status,
            "redis": server.publisher.status,
            "postgres": postgres,
            "recordings": server.recordings_status,
        }
        healthy_model = server.model_status in ("ok", "disabled")
        status = (
            "ok"
            if healthy_model and all(v == "ok" for v in parts.values() if v != "disabled")
            else "degraded"
        )
        body = {
            "status": status,
            **parts,
            "model_name": server.model_name,
            "calls_active": len(server.calls),
            "spooled_writes": server.store.spooled,
            "accepting": server.accepting,
        }
        return web.json_response(body, status=200 if server.accepting else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.server.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def process_audio(self, request: web.Request) -> web.Response:
        """A recording that did not come over AudioSocket: stored, queued, 202."""
        return await uploads.handle_upload(request, self.server.settings, self.server.jobs)

    async def get_call(self, request: web.Request) -> web.Response:
        """The call row, its live transcript, its job and its post-call results."""
        try:
            call_id = str(uuid.UUID(request.match_info["call_id"]))
        except ValueError:
            return uploads.error_response(404, "no such call")
        try:
            view = await self.server.jobs.call_view(call_id)
        except Exception as exc:  # Postgres away: say so, do not raise into aiohttp
            log.warning("call_view_failed", call_id=call_id, error=repr(exc))
            return uploads.error_response(503, "database unavailable")
        if view is None:
            return uploads.error_response(404, "no such call")
        return web.json_response(view)
