"""The live board (GET /, static files under /board/) and its feed, GET /events.

/events is Server-Sent Events carrying the same JSON as Redis, one message per event. Messages
of a call carry an SSE id: the time they were emitted, in ms, never going back within one
connection. A client that reconnects sends it as Last-Event-ID (EventSource does so itself; a
`last_event_id` query parameter does the same for clients that cannot set headers) and is sent
again what its calls kept from a few seconds before it (streamsrv.follow), so it misses nothing;
it drops what it has by (call_id, seq). Without one it is sent the active calls and the
BOARD_RECENT_CALLS that ended last, each from its start. `?call=<id>` (repeatable) follows only
those calls. A comment line every 15 s keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import uuid
from importlib import resources

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from streamsrv import events
from streamsrv.config import Settings
from streamsrv.follow import Followed, FollowSources, Message
from streamsrv.postcall.uploads import error_response

log = structlog.get_logger(__name__)

KEEPALIVE_SECONDS = 15.0
RETRY_MS = 2000  # how soon a browser reconnects
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


def board_file(name: str) -> tuple[bytes, str] | None:
    """A file of the board shipped in the package (streamsrv/board), and its content type."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        return None
    path = resources.files("streamsrv").joinpath("board", name)
    if not path.is_file():
        return None
    return path.read_bytes(), _TYPES[suffix]


async def serve_board_file(request: web.Request) -> web.Response:
    found = board_file(request.match_info.get("name", "index.html"))
    if found is None:
        return error_response(404, "no such file")
    body, content_type = found
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def resume_point(request: web.Request) -> float | None:
    """Seconds since the epoch from Last-Event-ID (or ?last_event_id), None when absent."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value / 1000 if value > 0 else None


def wanted_calls(request: web.Request) -> list[str] | None:
    """?call=<id>...: those calls (ValueError for one that is not a call id); else None."""
    given = request.query.getall("call", [])
    return [str(uuid.UUID(c)) for c in given] if given else None


def sse_frame(message: Message, last_id: int) -> tuple[bytes, int]:
    """The message as one SSE event, and the id a client now resumes from."""
    lines = []
    if message.seq is not None:
        last_id = max(last_id, int(message.emitted_at * 1000))
        lines.append(f"id: {last_id}")
    lines.append(f"data: {message.raw}")  # JSON from json.dumps holds no newline
    return ("\n".join(lines) + "\n\n").encode(), last_id


class EventsEndpoint:
    """GET /events (see the module doc), with the Redis connections it reads through."""

    def __init__(self, settings: Settings) -> None:
        channels = events.Channels(settings.redis_channel_prefix)
        self._recent = settings.board_recent_calls
        self._sources = FollowSources(settings.redis_url, channels)

    async def close(self) -> None:
        """End every open stream (their clients reconnect elsewhere or later), then the
        connections."""
        await self._sources.close()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        try:
            calls = wanted_calls(request)
        except ValueError:
            return error_response(400, "call= takes call ids")
        since = resume_point(request)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass events on at once
            }
        )
        try:
            async with self._sources.following(
                calls=calls, since=since, recent=self._recent
            ) as followed:
                await response.prepare(request)
                await response.write(f"retry: {RETRY_MS}\n\n".encode())
                await self._send(response, followed, int((since or 0) * 1000))
        except ConnectionResetError:
            return response  # the client went away
        except (ConnectionError, RedisError) as exc:
            if response.prepared:
                return response  # the client reconnects and replays
            log.warning("events_unavailable", error=repr(exc))
            return error_response(503, "Redis unavailable")
        return response

    async def _send(self, response: web.StreamResponse, followed: Followed, last_id: int) -> None:
        """The replay, then live messages until the feed ends this follower or the client
        goes away."""
        for kept in followed.replayed:
            frame, last_id = sse_frame(kept, last_id)
            await response.write(frame)
        while True:
            try:
                message = await asyncio.wait_for(followed.next(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if message is None:
                return
            frame, last_id = sse_frame(message, last_id)
            await response.write(frame)
