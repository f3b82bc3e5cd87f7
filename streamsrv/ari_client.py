"""Asterisk's REST Interface (ARI) as streamsrv uses it: a few REST calls and the event stream.

Transport only: it knows URLs, methods and status codes, never which channels to snoop or what
a leg is (that is streamsrv.ari_watch). The REST calls share one aiohttp session with HTTP basic
auth (ARI_USER / ARI_PASSWORD, never in a URL, so never in a log line); the events come over a
WebSocket on the same session (`/ari/events?app=NAME`), one JSON object per message.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

REQUEST_SECONDS = 10.0


class AriError(Exception):
    """A REST call that Asterisk answered with an error status."""

    def __init__(self, method: str, path: str, status: int, text: str) -> None:
        super().__init__(f"{method} {path}: {status} {text[:200]}")
        self.status = status


class AriClient:
    """One ARI server: `base_url` is Asterisk's HTTP server (http.conf), e.g.
    http://127.0.0.1:8088; the API lives under /ari there."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, app: str) -> None:
        self._session = session
        self._api = base_url.rstrip("/") + "/ari"
        self.app = app

    @staticmethod
    def session(user: str, password: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            headers={"Authorization": basic_auth(user, password)},
            timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS),
        )

    async def _call(self, method: str, path: str, **params: str) -> Any:
        async with self._session.request(method, self._api + path, params=params) as response:
            text = await response.text()
            if response.status >= 300:
                raise AriError(method, path, response.status, text)
            return json.loads(text) if text else None

    async def _gone_ok(self, method: str, path: str, **params: str) -> bool:
        """A call whose target may already be gone: False on 404, True when done."""
        try:
            await self._call(method, path, **params)
        except AriError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- channels ------------------------------------------------------------------------------

    async def continue_in_dialplan(self, channel_id: str) -> None:
        await self._call("POST", f"/channels/{channel_id}/continue")

    async def variable(self, channel_id: str, name: str) -> str | None:
        """A channel variable (or function such as CHANNEL(linkedid)); None when unset."""
        try:
            found = await self._call("GET", f"/channels/{channel_id}/variable", variable=name)
        except AriError as exc:
            if exc.status == 404:
                return None
            raise
        value = found.get("value") if isinstance(found, dict) else None
        return value if isinstance(value, str) and value else None

    async def snoop(self, channel_id: str, snoop_id: str, spy: str) -> None:
        """A snoop channel on `channel_id` hearing `spy` (in, out), put into this app."""
        await self._call("POST", f"/channels/{channel_id}/snoop/{snoop_id}", spy=spy, app=self.app)

    async def external_media_audiosocket(
        self, channel_id: str, address: str, call_id: str, audio_format: str = "slin16"
    ) -> None:
        """A channel that connects to `address` over TCP and speaks AudioSocket, announcing
        `call_id` as its UUID; put into this app."""
        await self._call(
            "POST",
            "/channels/externalMedia",
            channelId=channel_id,
            app=self.app,
            external_host=address,
            encapsulation="audiosocket",
            transport="tcp",
            format=audio_format,
            data=call_id,
        )

    async def hangup(self, channel_id: str) -> bool:
        return await self._gone_ok("DELETE", f"/channels/{channel_id}")

    async def channel_exists(self, channel_id: str) -> bool:
        return await self._gone_ok("GET", f"/channels/{channel_id}")

    async def channel(self, channel_id: str) -> dict[str, Any]:
        found: dict[str, Any] = await self._call("GET", f"/channels/{channel_id}")
        return found

    async def channels(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._call("GET", "/channels")
        return found

    # -- bridges -------------------------------------------------------------------------------

    async def create_bridge(self, bridge_id: str) -> None:
        await self._call("POST", f"/bridges/{bridge_id}", type="mixing", name=bridge_id)

    async def add_to_bridge(self, bridge_id: str, *channel_ids: str) -> None:
        await self._call("POST", f"/bridges/{bridge_id}/addChannel", channel=",".join(channel_ids))

    async def destroy_bridge(self, bridge_id: str) -> bool:
        return await self._gone_ok("DELETE", f"/bridges/{bridge_id}")

    async def bridges(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._call("GET", "/bridges")
        return found

    # -- the application -----------------------------------------------------------------------

    async def subscribe_channel(self, channel_id: str) -> None:
        """This app gets the channel's events (its hangup) also once it has left Stasis."""
        await self._call(
            "POST", f"/applications/{self.app}/subscription", eventSource=f"channel:{channel_id}"
        )

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The app's event stream: connected on entry (aiohttp.ClientError / OSError when
        Asterisk is away); the iterator ends when the connection does."""
        url = self._api.replace("http", "ws", 1) + "/events"
        async with self._session.ws_connect(
            url, params={"app": self.app}, heartbeat=20.0, timeout=aiohttp.ClientWSTimeout()
        ) as ws:
            yield _messages(ws)


async def _messages(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            break
        with contextlib.suppress(ValueError):
            event = json.loads(message.data)
            if isinstance(event, dict):
                yield event


def basic_auth(user: str, password: str) -> str:
    """The Authorization header value of HTTP basic auth (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def backoff(attempt: int, cap: float = 5.0) -> float:
    """Seconds before reconnect attempt `attempt` (1, 2, ...): 0.25 doubling, at most `cap`."""
    return float(min(cap, 0.25 * 2 ** (attempt - 1)))
