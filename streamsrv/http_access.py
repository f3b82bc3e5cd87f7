"""Who may use streamsrv's HTTP: an aiohttp middleware for every route.

Reads of what callers said (the board at /, GET /events, /calls/<id>, /conversations/<id>,
/queue) need credentials when HTTP_HOST is not loopback, and wherever BOARD_PASSWORD or
HTTP_TOKEN is set: basic auth as BOARD_USER / BOARD_PASSWORD (what a browser asks a supervisor
for) or the bearer HTTP_TOKEN (for programs). Without them the answer is 401 and no data.
/health and /metrics stay open: probes and Prometheus read them, and they hold no words.

Writes (every POST) change what a call is or queue work, so when HTTP_HOST is not loopback they
need protection: HTTP_ALLOWED_PEERS (peers they may come from) and/or HTTP_TOKEN (a bearer token
they must carry). Bound elsewhere than loopback with neither set, writes are refused. A token
that is set is required on loopback too.

Credentials are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from streamsrv.admission import PeerFilter
from streamsrv.config import Settings
from streamsrv.postcall.uploads import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/metrics"})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _basic(request: web.Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def access_guard(settings: Settings) -> Any:
    """aiohttp middleware: 401/403 for requests the settings do not allow (see module doc)."""
    peers = PeerFilter(settings.http_allowed_peers)
    token = settings.http_token
    loopback = _is_loopback(settings.http_host)
    open_writes = not (loopback or settings.http_allowed_peers or token)
    reads_need_credentials = not loopback or bool(settings.board_password or token)

    def reader_allowed(request: web.Request) -> bool:
        given = _bearer(request)
        if token and given is not None and _equal(given, token):
            return True
        basic = _basic(request)
        if settings.board_password and basic is not None:
            user_ok = _equal(basic[0], settings.board_user)
            return _equal(basic[1], settings.board_password) and user_ok
        return False

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            if open_writes:
                return error_response(403, "HTTP writes need HTTP_TOKEN or HTTP_ALLOWED_PEERS here")
            if settings.http_allowed_peers and not peers.allows(request.remote or ""):
                return error_response(403, "this peer may not write")
            if token and not _equal(_bearer(request) or "", token):
                return error_response(401, "a bearer token is required")
        elif (
            request.path not in OPEN_PATHS
            and reads_need_credentials
            and not reader_allowed(request)
        ):
            response = error_response(401, "credentials are required (BOARD_PASSWORD)")
            response.headers["WWW-Authenticate"] = 'Basic realm="streamsrv", charset="UTF-8"'
            return response
        return await handler(request)

    return guard
