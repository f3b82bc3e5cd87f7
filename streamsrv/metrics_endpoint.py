"""GET /metrics of one Prometheus registry on a host and port of its own (aiohttp, on the
caller's loop): for the processes that are not the server (the post-call worker, `streamsrv
ari`), each of which is a Prometheus target of its own."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry, port_variable: str) -> None:
        self._registry = registry
        self._variable = port_variable  # named in the error when the port cannot be had
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._render)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen; OSError naming the port's variable when it cannot (taken, not allowed)."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            await self.close()
            raise OSError(
                f"{self._variable} {port}: {exc.strerror or exc}"
                " (each process needs a port of its own, or 0 for none)"
            ) from exc

    @property
    def port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("the metrics are not served")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _render(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
