"""The legs of one conversation merged in time order, without I/O.

Two AudioSocket streams that share a `conversation` in their context (one per direction, or per
leg) are one conversation. Each leg's finals come out in its own order, at its own pace; the
conversation's finals must come out in the order they were spoken across legs. So a final of
one leg is held until every other leg has settled past the moment it started: until no other
leg can still produce a final that began earlier. A leg is settled up to the start of its
oldest unpublished speech (its first pending final, else its open segment, else all the audio
VAD has heard); an ended leg is settled for good.

Times are wall-clock seconds: a leg's start time plus the seconds of its audio, so legs that
connected at different moments line up. A leg takes part from the moment it joins: finals it
published before its context named the conversation are not repeated here.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Leg:
    started_at: float  # wall time of the leg's first audio
    settled: float = 0.0  # wall time up to which the leg has published every final


@dataclass
class ConversationMerger:
    conversation: str
    _legs: dict[str, _Leg] = field(default_factory=dict)
    _held: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # a heap
    _order: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def legs(self) -> list[str]:
        return list(self._legs)

    def join(self, call_id: str, started_at: float, settled: float) -> None:
        """A leg takes part: it started at wall time `started_at` and has published every
        final that starts before `settled` seconds of its audio."""
        self._legs.setdefault(call_id, _Leg(started_at, started_at + settled))

    def final(self, call_id: str, message: dict[str, Any]) -> list[dict[str, Any]]:
        """A leg's final (its published JSON): what may now go out, in time order."""
        leg = self._legs[call_id]
        at = leg.started_at + float(message["start"])
        heapq.heappush(self._held, (at, next(self._order), message))
        return self._release()

    def settled(self, call_id: str, seconds: float) -> list[dict[str, Any]]:
        """The leg has published every final that starts before `seconds` of its audio."""
        leg = self._legs.get(call_id)
        if leg is not None:
            leg.settled = max(leg.settled, leg.started_at + seconds)
        return self._release()

    def leave(self, call_id: str) -> list[dict[str, Any]]:
        """The leg ended (after its last final): it holds back nobody any more."""
        leg = self._legs.get(call_id)
        if leg is not None:
            leg.settled = math.inf
        return self._release()

    @property
    def done(self) -> bool:
        """Every leg has ended and nothing is held."""
        return not self._held and all(leg.settled == math.inf for leg in self._legs.values())

    def _release(self) -> list[dict[str, Any]]:
        out = []
        while self._held:
            at, _, message = self._held[0]
            others = (leg for cid, leg in self._legs.items() if cid != message["call_id"])
            if any(leg.settled < at for leg in others):
                break
            heapq.heappop(self._held)
            out.append(message)
        return out


class ConversationHub:
    """The conversations with a leg on this server. Released finals go to `publish`
    (conversation, message); a conversation is forgotten once every leg has left."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None]) -> None:
        self._publish = publish
        self._open: dict[str, ConversationMerger] = {}

    def __len__(self) -> int:
        return len(self._open)

    def join(self, conversation: str, call_id: str, started_at: float, settled: float) -> None:
        merger = self._open.setdefault(conversation, ConversationMerger(conversation))
        merger.join(call_id, started_at, settled)

    def final(self, conversation: str, call_id: str, message: dict[str, Any]) -> None:
        self._out(conversation, lambda m: m.final(call_id, message))

    def settled(self, conversation: str, call_id: str, seconds: float) -> None:
        self._out(conversation, lambda m: m.settled(call_id, seconds))

    def leave(self, conversation: str, call_id: str) -> None:
        self._out(conversation, lambda m: m.leave(call_id))

    def alert(self, conversation: str, message: dict[str, Any]) -> None:
        """An alert goes out at once: someone may be in danger now, and the final it is
        about may wait in the merger for the other leg."""
        if conversation in self._open:
            self._publish(conversation, message)

    def _out(
        self, conversation: str, step: Callable[[ConversationMerger], list[dict[str, Any]]]
    ) -> None:
        merger = self._open.get(conversation)
        if merger is None:
            return
        for message in step(merger):
            self._publish(conversation, message)
        if merger.done:
            del self._open[conversation]


@dataclass(frozen=True)
class LegResult:
    """One leg's post-call result, for the conversation's transcript."""

    call_id: str
    role: str | None
    started_at: float  # wall time of the leg's first audio
    segments: list[dict[str, Any]]  # postcall_results.segments: start, end, text, words


def merge_legs(legs: list[LegResult]) -> tuple[str, list[dict[str, Any]]]:
    """One speaker-labelled transcript of a conversation: every leg's words placed at their
    wall time and read in that order, each run of one leg's words a turn. A segment without
    word times counts as one word at its start. Returns ("role: text" lines, the turns)."""
    words: list[tuple[float, float, str, str | None, str]] = []
    for leg in legs:
        for segment in leg.segments:
            timed = segment.get("words") or [
                {"word": segment["text"], "start": segment["start"], "end": segment["end"]}
            ]
            for w in timed:
                text = str(w["word"]).strip()
                if text:
                    at = leg.started_at + float(w["start"])
                    words.append(
                        (at, leg.started_at + float(w["end"]), leg.call_id, leg.role, text)
                    )
    words.sort(key=lambda w: (w[0], w[2]))
    turns: list[dict[str, Any]] = []
    for start, end, call_id, role, text in words:
        if turns and turns[-1]["call_id"] == call_id:
            turns[-1]["end"] = max(turns[-1]["end"], round(end, 3))
            turns[-1]["text"] += " " + text
        else:
            turns.append(
                {
                    "call_id": call_id,
                    "role": role,
                    "start": round(start, 3),
                    "end": round(end, 3),
                    "text": text,
                }
            )
    lines = [f"{t['role'] or t['call_id']}: {t['text']}" for t in turns]
    return "\n".join(lines), turns


class ConversationLeg:
    """One call's part in the conversation its context names, if any: joins and leaves it,
    and hands the hub the call's finals and how far the call has settled."""

    def __init__(self, hub: ConversationHub | None, call_id: str, started_at: float) -> None:
        self._hub = hub
        self.call_id = call_id
        self.started_at = started_at
        self.conversation: str | None = None

    def follow(self, conversation: str | None, settled: float, live: bool) -> None:
        """Take part in `conversation` (leaving one named before). A call without live
        transcription publishes no finals: it holds nobody back."""
        hub = self._hub
        if hub is None or conversation == self.conversation:
            return
        self.leave()
        self.conversation = conversation
        if conversation:
            hub.join(conversation, self.call_id, self.started_at, settled)
            if not live:
                hub.leave(conversation, self.call_id)

    def final(self, message: dict[str, Any]) -> None:
        if self._hub is not None and self.conversation:
            self._hub.final(self.conversation, self.call_id, message)

    def settled(self, seconds: float) -> None:
        if self._hub is not None and self.conversation:
            self._hub.settled(self.conversation, self.call_id, seconds)

    def alert(self, message: dict[str, Any]) -> None:
        if self._hub is not None and self.conversation:
            self._hub.alert(self.conversation, message)

    def leave(self) -> None:
        if self._hub is not None and self.conversation:
            self._hub.leave(self.conversation, self.call_id)
