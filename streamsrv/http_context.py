"""POST /calls/<call_id>/context.

The body is what Asterisk's CURL() dialplan function sends (application/x-www-form-urlencoded)
or a JSON object; see streamsrv.context for the fields. 200 {"call_id", "state", "context"}
where state is `applied` (the call runs: in effect from now on) or `held` (it has not connected
yet: applied when it does, if within CONTEXT_PENDING_SECONDS); 400 (not a form or JSON object,
not a call id), 413 (over MAX_BODY_BYTES), 422 (a bad field), 409 (the call has ended), each
with {"error": ...}.

Who may post is streamsrv.http_access's concern.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol
from urllib.parse import parse_qsl

from aiohttp import web

from streamsrv.context import (
    MAX_BODY_BYTES,
    CallContext,
    ContextError,
    parse_context,
    whisper_languages,
)
from streamsrv.postcall.uploads import error_response


class ContextSink(Protocol):
    """Where posted context goes (the server)."""

    @property
    def english_only(self) -> bool: ...

    def post_context(self, call_id: str, context: CallContext) -> tuple[str, CallContext]:
        """(`applied`, `held` or `ended`; the call's context as it now stands)."""

    async def conversation_view(self, conversation: str) -> dict[str, Any] | None:
        """Its legs and merged transcript; None for an unknown conversation."""


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
