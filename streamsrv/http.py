"""HTTP on HTTP_HOST:HTTP_PORT: GET /health and GET /metrics (aiohttp, on the server's loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from streamsrv.server import Server


class HttpApi:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
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
        server = self.server
        if server.executor is not None:
            server.metrics.queue_length.set(server.executor.queued)
        return web.Response(
            body=server.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
