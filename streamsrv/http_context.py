"""POST /calls/<call_id>/context, and who may write over HTTP.

The body is what Asterisk's CURL() dialplan function sends (application/x-www-form-urlencoded)
or a JSON object; see streamsrv.context for the fields. 200 {"call_id", "state", "context"}
where state is `applied` (the call runs: in effect from now on) or `held` (it has not connected
yet: applied when it does, if within CONTEXT_PENDING_SECONDS); 400 (not a form or JSON object,
not a call id), 413 (over MAX_BODY_BYTES), 422 (a bad field), 409 (the call has ended), each
with {"error": ...}.

Writes (every POST) change what a call is or queue work, so when HTTP_HOST is not loopback they
need protection: HTTP_ALLOWED_PEERS (peers they may come from) and/or HTTP_TOKEN (a bearer token
they must carry, compared in constant time and never logged). Bound elsewhere than loopback with
neither set, writes are refused. A token that is set is required on loopback too.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl

from aiohttp import web

from streamsrv.admission import PeerFilter
from streamsrv.config import Settings
from streamsrv.context import (
    MAX_BODY_BYTES,
    CallContext,
    ContextError,
    parse_context,
    whisper_languages,
)
from streamsrv.postcall.uploads import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ContextSink(Protocol):
    """Where posted context goes (the server)."""

    @property
    def english_only(self) -> bool: ...

    def post_context(self, call_id: str, context: CallContext) -> tuple[str, CallContext]:
        """(`applied`, `held` or `ended`; the call's context as it now stands)."""

    async def conversation_view(self, conversation: str) -> dict[str, Any] | None:
        """Its legs and merged transcript; None for an unknown conversation."""


def write_guard(settings: Settings) -> Any:
    """aiohttp middleware: refuse a POST that the settings do not allow (401 or 403)."""
    peers = PeerFilter(settings.http_allowed_peers)
    token = settings.http_token.encode()
    try:
        loopback = ipaddress.ip_address(settings.http_host).is_loopback
    except ValueError:
        loopback = settings.http_host == "localhost"
    open_writes = not (loopback or settings.http_allowed_peers or settings.http_token)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            if open_writes:
                return error_response(403, "HTTP writes need HTTP_TOKEN or HTTP_ALLOWED_PEERS here")
            if settings.http_allowed_peers and not peers.allows(request.remote or ""):
                return error_response(403, "this peer may not write")
            if token:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), token):
                    return error_response(401, "a bearer token is required")
        return await handler(request)

    return guard


async def post_context(request: web.Request, sink: ContextSink) -> web.Response:
    try:
        call_id = str(uuid.UUID(request.match_info["call_id"]))
    except ValueError:
        return error_response(400, "not a call id (the UUID Asterisk sends)")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error_response(413, f"the body is over {MAX_BODY_BYTES} bytes")
    body = await request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        return error_response(413, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        values = _fields(request.content_type, body)
        context = parse_context(values, whisper_languages(), sink.english_only)
    except ContextError as exc:
        return error_response(exc.status, exc.message)
    state, now = sink.post_context(call_id, context)
    if state == "ended":
        return error_response(409, "the call has ended")
    return web.json_response({"call_id": call_id, "state": state, "context": now.as_json()})


def _fields(content_type: str, body: bytes) -> dict[str, Any]:
    if content_type == "application/json":
        try:
            values = json.loads(body)
        except ValueError:
            raise ContextError(400, "the body is not JSON") from None
        if not isinstance(values, dict):
            raise ContextError(400, "the body is not a JSON object")
        return values
    if content_type in ("application/x-www-form-urlencoded", "application/octet-stream", ""):
        try:
            return dict(
                parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
            )
        except (UnicodeDecodeError, ValueError):
            raise ContextError(400, "the body is not form-encoded") from None
    raise ContextError(400, "send application/x-www-form-urlencoded or application/json")
