"""Where context from the PBX meets the calls: held for a call that has not connected,
applied to a running one, refused for one that ended; and the view of a conversation.
It is what HTTP sees of the server for `POST /calls/<id>/context` and
`GET /conversations/<id>` (streamsrv.http_context.ContextSink)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from streamsrv.call import Call
from streamsrv.config import Settings
from streamsrv.context import CallContext, PendingContexts
from streamsrv.publish import Publisher
from streamsrv.repositories import CallRepository


class ContextDesk:
    def __init__(
        self,
        settings: Settings,
        running: Callable[[str], Call | None],
        ended: Callable[[str], bool],
        calls: CallRepository,
        publisher: Publisher,
    ) -> None:
        self.held = PendingContexts(settings.context_pending_max, settings.context_pending_seconds)
        self.english_only = False  # the live model knows only English (set once it is loaded)
        self._running = running
        self._ended = ended
        self._calls = calls
        self._publisher = publisher

    def take(self, call_id: str) -> CallContext | None:
        """The context held for a call that has just connected, if any."""
        return self.held.take(call_id, time.monotonic())

    def post_context(self, call_id: str, context: CallContext) -> tuple[str, CallContext]:
        """`applied` to the running call, `held` until it connects (bounded: PendingContexts),
        or `ended` (refused); and the call's context as it now stands."""
        call = self._running(call_id)
        if self._ended(call_id) or (call is not None and call.ended):
            return "ended", context
        if call is not None:
            call.set_context(context)
            assert call.context is not None
            return "applied", call.context
        return "held", self.held.put(call_id, context, time.monotonic())

    async def conversation_view(self, conversation: str) -> dict[str, Any] | None:
        """Its legs (their rows), its merged transcript (the finals of every leg in time
        order, while its stream is kept: REDIS_STREAM_TTL) and the post-call pass's; None
        for an unknown conversation."""
        legs = await self._calls.conversation(conversation)
        finals = await self._publisher.conversation_so_far(conversation)
        if not legs and not finals:
            return None
        started = {
            str(leg["call_id"]): datetime.fromisoformat(leg["created_at"]).timestamp()
            for leg in legs
        }
        merged = [
            {
                "call_id": m["call_id"],
                "role": m.get("role"),
                "at": round(started.get(m["call_id"], 0.0) + m["start"], 3),
                "start": m["start"],
                "end": m["end"],
                "segment": m["segment"],
                "text": m["text"],
            }
            for m in finals
        ]
        return {
            "conversation": conversation,
            "legs": legs,
            "transcript": merged,
            "postcall": await self._calls.conversation_result(conversation),
        }
