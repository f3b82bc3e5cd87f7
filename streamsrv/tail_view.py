"""What `streamsrv tail` prints for each message: a pure renderer, messages in, text out.

One line per final, DTMF key, alert and lifecycle event, each led by the time in the call
(m:ss of call audio), the short call id when several calls are shown, and the call's role and
language once known. On a terminal the current partial is the last line, redrawn in place
(carriage return, erase line) and clipped to the terminal's width so that it never wraps (a
wrapped line could not be erased); its final replaces it. Elsewhere (a pipe, a file) lines are
plain: no escape codes, partials only when asked for, one line each.

Texts come from callers and from whoever posts call context: control characters are replaced
before printing, so that no message can move the cursor or retitle the terminal.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from streamsrv import events

ERASE = "\r\033[K"  # back to the start of the line, erase it
RESET = "\033[0m"
BOLD = "\033[1m"
DIM = "\033[2m"
ALERT = "\033[1;7;31m"  # bold, reverse video, red
SHORT_ID = 8  # characters of a call id shown when several calls are followed
ABOUT = ("caller", "agent", "queue", "conversation")  # context shown when a call starts


def clock(seconds: float | None) -> str:
    """m:ss (h:mm:ss past an hour) of call time; -:-- when unknown."""
    if seconds is None or seconds < 0:
        return "-:--"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def printable(text: object) -> str:
    """The text with control and other unprintable characters (ESC, CR, newlines, bidi
    overrides) replaced by spaces."""
    return "".join(ch if ch.isprintable() else " " for ch in str(text))


def columns(text: str) -> int:
    """Terminal columns the (printable) text takes: wide East Asian characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def clip_right(text: str, width: int) -> str:
    """The start of text, within width columns."""
    kept, used = [], 0
    for ch in text:
        used += columns(ch)
        if used > width:
            break
        kept.append(ch)
    return "".join(kept)


def clip_left(head: str, text: str, width: int) -> str:
    """head + the end of text, within width columns (the latest words of a partial matter)."""
    room = width - columns(head)
    if columns(text) <= room:
        return head + text
    if room < 2:
        return clip_right(head, width)
    kept: list[str] = []
    used = 1  # the ellipsis
    for ch in reversed(text):
        used += columns(ch)
        if used > room:
            break
        kept.append(ch)
    return head + "…" + "".join(reversed(kept))


@dataclass(slots=True)
class CallInfo:
    """What is known of a call, for the lines of its messages."""

    started_at: float | None = None
    role: str | None = None
    language: str | None = None
    finalised: int = -1  # the last segment whose final was shown

    def learn(self, context: dict[str, Any] | None) -> None:
        context = context or {}
        if context.get("role"):
            self.role = str(context["role"])
        if context.get("language") and context["language"] != "auto":
            self.language = str(context["language"])


class TailView:
    """Turns messages (the published JSON objects, in order) into text for a terminal or a
    pipe. `render` gives what to write for one message; `clear` what erases the partial line
    before something else (a warning, the exit) is written."""

    def __init__(
        self,
        *,
        terminal: bool,
        color: bool = True,
        show_call: bool = False,
        partials: bool = False,
        width: int = 80,
    ) -> None:
        self.terminal = terminal
        self.color = color and terminal
        self.show_call = show_call
        self.partials = partials or terminal
        self.width = width  # the terminal's columns; the caller keeps it current
        self._calls: dict[str, CallInfo] = {}
        self._open: dict[str, tuple[int, str, str]] = {}  # call -> segment, head, text; newest last
        self._drawn = False  # a partial is on the screen's last line, the cursor after it

    def render(self, message: dict[str, Any]) -> str:
        kind = message.get("type")
        call_id = str(message.get("call_id", ""))
        info = self._calls.setdefault(call_id, CallInfo())
        if kind == "alert":
            return self._line(self._alert(message, info), ALERT)
        try:
            event = events.decode(message)
        except (KeyError, TypeError, ValueError):
            return ""  # a type this version does not know, or not a message
        emitted = message.get("emitted_at")
        at = None  # when a message carries no time in the call: since its start
        if isinstance(emitted, int | float) and info.started_at is not None:
            at = emitted - info.started_at
        match event:
            case events.Partial():
                return self._partial(call_id, event, info)
            case events.Final():
                info.role = event.role or info.role
                info.language = event.language or info.language
                info.finalised = max(info.finalised, event.segment)
                self._close_partial(call_id, event.segment)
                if not event.text.strip():
                    return self._redraw()  # nothing was said after all: the partial goes
                return self._line(self._head(call_id, event.start, info) + event.text)
            case events.CallStarted():
                info.started_at = event.started_at
                info.language = event.language or info.language
                info.learn(event.context)
                details = [f"from {event.peer}", *self._described(event.context)]
                text = "call started " + ", ".join(details)
                return self._line(self._head(call_id, 0.0, info) + text, BOLD)
            case events.CallContext():
                info.learn(event.context)
                text = "context: " + ", ".join(self._described(event.context, everything=True))
                return self._line(self._head(call_id, at, info) + text, DIM)
            case events.LanguageDetected():
                info.language = event.language
                was = f", was {event.previous}" if event.previous else ""
                text = f"language {event.language} ({event.probability:.0%}{was})"
                return self._line(self._head(call_id, event.at, info) + text, DIM)
            case events.Dtmf():
                return self._line(self._head(call_id, event.at, info) + f"DTMF {event.digit}")
            case events.CallEnded():
                self._open.pop(call_id, None)
                parts = [event.reason, clock(event.duration)]
                if event.segments is not None:
                    parts.append(f"{event.segments} segments")
                if event.job_id is not None:
                    parts.append(f"post-call job {event.job_id}")
                text = "call ended: " + ", ".join(parts)
                return self._line(self._head(call_id, event.duration, info) + text, BOLD)
            case events.PostcallDone():
                text = f"post-call done ({event.model}, {event.language or 'language unknown'})"
                return self._line(self._head(call_id, None, info) + text, DIM)
            case events.PostcallFailed():
                text = f"post-call failed after {event.attempts} attempts: {event.error}"
                return self._line(self._head(call_id, None, info) + text, DIM)
        return ""

    def clear(self) -> str:
        """Erases the partial on the screen (it is drawn again with the next line)."""
        if not self._drawn:
            return ""
        self._drawn = False
        return ERASE

    def _head(self, call_id: str, at: float | None, info: CallInfo) -> str:
        parts = [clock(at)]
        if self.show_call:
            parts.append(call_id[:SHORT_ID])
        label = "/".join(x for x in (info.role, info.language) if x)
        if label:
            parts.append(label)
        return printable(" ".join(parts)) + "  "

    @staticmethod
    def _described(context: dict[str, Any] | None, everything: bool = False) -> list[str]:
        """Context fields as `name value`: all of them, or those the line's head lacks."""
        context = context or {}
        keys = (
            [k for k in context if k != "tags"]
            if everything
            else [k for k in ABOUT if k in context]
        )
        found = [f"{k} {context[k]}" for k in keys if context[k]]
        tags = context.get("tags")
        if everything and isinstance(tags, dict) and tags:
            found.append("tags " + " ".join(f"{k}={v}" for k, v in tags.items()))
        return found

    def _alert(self, message: dict[str, Any], info: CallInfo) -> str:
        start = message.get("start")
        head = self._head(
            str(message.get("call_id", "")),
            float(start) if isinstance(start, int | float) else None,
            info,
        )
        phrase = message.get("phrase", "")
        name = f"{message['label']} ({phrase})" if message.get("label") else str(phrase)
        seen_in = " (in a partial)" if message.get("source") == "partial" else ""
        return f"{head}ALERT {name}{seen_in}: {message.get('text', '')}"

    def _partial(self, call_id: str, event: events.Partial, info: CallInfo) -> str:
        head = self._head(call_id, event.start, info)
        text = printable(event.text)
        if event.segment <= info.finalised:
            return ""  # late: its final is shown already
        if not self.terminal:
            return f"{head}… {text}\n" if self.partials else ""
        self._open.pop(call_id, None)
        self._open[call_id] = (event.segment, head, text)  # the newest is the one drawn
        return self._redraw()

    def _close_partial(self, call_id: str, segment: int) -> None:
        opened = self._open.get(call_id)
        if opened is not None and opened[0] <= segment:
            del self._open[call_id]

    def _line(self, text: str, style: str = "") -> str:
        """A permanent line; on a terminal it takes the partial's place, which is redrawn
        below it."""
        text = printable(text)
        if self.color and style:
            text = f"{style}{text}{RESET}"
        if not self.terminal:
            return text + "\n"
        return self.clear() + text + "\n" + self._redraw()

    def _redraw(self) -> str:
        if not self._open:
            return self.clear()
        _, head, text = next(reversed(self._open.values()))
        shown = clip_left(head, text, max(self.width - 1, 1))
        self._drawn = True
        return ERASE + (f"{DIM}{shown}{RESET}" if self.color else shown)
