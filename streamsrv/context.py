"""Call context: who and what a call is, as Asterisk tells it (POST /calls/<id>/context).

AudioSocket carries only the call's UUID. Its context (the language to transcribe in, the role
of the stream such as caller or agent, the conversation it belongs to such as the PBX's
linkedid, caller and agent numbers, the queue, and a few free tags) comes over HTTP, before the
call connects or while it runs. Everything here is pure: parsing and checking the fields, merging
a later post into an earlier one, and the bounded store of contexts that came before their call.

What is accepted: `language` (a Whisper code, or `auto`), `role` (a short lowercase word:
`caller`, `agent`, `mixed`, `supervisor`...), `conversation`, `caller`, `agent`, `queue`
(printable text up to MAX_VALUE_CHARS), and tags (`tags` as a JSON object, or `tags.NAME=value`
in a form), at most MAX_TAGS of them. An empty value means "not given", so a dialplan can pass
`${CALLERID(num)}` as it is. Unknown fields are refused, so that a typo is an error, not a
silently lost field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MAX_BODY_BYTES = 8192
MAX_VALUE_CHARS = 128
MAX_TAGS = 16
MAX_TAG_KEY_CHARS = 32
MAX_TAG_VALUE_CHARS = 256
TEXT_FIELDS = ("conversation", "caller", "agent", "queue")
_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,32}")


@functools.cache
def whisper_languages() -> frozenset[str]:
    """The language codes Whisper knows (read once from faster-whisper)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return frozenset(_LANGUAGE_CODES)


class ContextError(Exception):
    """Bad context: the HTTP status (400, 413, 422) and the message for {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CallContext:
    language: str | None = None  # a Whisper code or "auto"; None: not given
    role: str | None = None
    conversation: str | None = None
    caller: str | None = None
    agent: str | None = None
    queue: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def merged(self, later: CallContext) -> CallContext:
        """This context with what a later post gave: its fields win, tags are added."""
        given = {f.name: getattr(later, f.name) for f in fields(later) if f.name != "tags"}
        updated = {k: v for k, v in given.items() if v is not None}
        return replace(self, **updated, tags={**self.tags, **later.tags})

    def as_json(self) -> dict[str, Any]:
        """The fields given, as published and stored."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "tags" and getattr(self, f.name) is not None
        }
        if self.tags:
            out["tags"] = dict(self.tags)
        return out

    @property
    def fixed_language(self) -> str | None:
        """The language the call is to be transcribed in; None: detect it."""
        return None if self.language in (None, "auto") else self.language


def parse_context(
    values: Mapping[str, Any], languages: frozenset[str], english_only: bool
) -> CallContext:
    """The context of a form's or a JSON object's fields; ContextError when one is bad.
    `languages`: the Whisper codes; `english_only`: the live model knows only English."""
    unknown = sorted(
        k
        for k in values
        if k not in (*TEXT_FIELDS, "language", "role", "tags") and not k.startswith("tags.")
    )
    if unknown:
        raise ContextError(422, f"unknown field(s): {', '.join(unknown)}")
    found: dict[str, Any] = {}
    language = _text(values, "language")
    if language is not None:
        found["language"] = _language(language.lower(), languages, english_only)
    role = _text(values, "role")
    if role is not None:
        if not _ROLE.fullmatch(role.lower()):
            raise ContextError(422, "`role` must be a short word (a-z, 0-9, _ or -), e.g. caller")
        found["role"] = role.lower()
    for name in TEXT_FIELDS:
        found[name] = _text(values, name)
    return CallContext(**found, tags=_tags(values))


def _text(values: Mapping[str, Any], name: str) -> str | None:
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ContextError(422, f"`{name}` must be a string")
    value = value.strip()
    if len(value) > MAX_VALUE_CHARS:
        raise ContextError(422, f"`{name}` is longer than {MAX_VALUE_CHARS} characters")
    if not value.isprintable():
        raise ContextError(422, f"`{name}` holds control characters")
    return value or None


def _language(value: str, languages: frozenset[str], english_only: bool) -> str:
    if value != "auto" and value not in languages:
        raise ContextError(422, f"`language` {value!r} is not a Whisper language code or auto")
    if english_only and value not in ("en", "auto"):
        raise ContextError(
            422, f"`language` {value!r}: the live model transcribes English only (an .en model)"
        )
    return value


def _tags(values: Mapping[str, Any]) -> dict[str, str]:
    raw = values.get("tags")
    if raw is not None and not isinstance(raw, dict):
        raise ContextError(422, "`tags` must be an object of strings")
    pairs = dict(raw or {})
    pairs.update({k.removeprefix("tags."): v for k, v in values.items() if k.startswith("tags.")})
    if len(pairs) > MAX_TAGS:
        raise ContextError(422, f"at most {MAX_TAGS} tags")
    tags = {}
    for key, value in pairs.items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise ContextError(
                422, f"tag name {key!r}: 1 to {MAX_TAG_KEY_CHARS} of A-Z a-z 0-9 _ . : -"
            )
        if (
            not isinstance(value, str)
            or len(value) > MAX_TAG_VALUE_CHARS
            or not value.isprintable()
        ):
            raise ContextError(
                422, f"tag {key!r}: a printable string of at most {MAX_TAG_VALUE_CHARS} characters"
            )
        tags[key] = value
    return tags


class PendingContexts:
    """Contexts posted before their call connected: kept for `ttl` seconds, at most `limit`
    of them (the oldest go first), so unknown ids never grow memory without bound."""

    def __init__(self, limit: int, ttl: float) -> None:
        self.limit = limit
        self.ttl = ttl
        self._held: dict[str, tuple[CallContext, float]] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._held)

    def put(self, call_id: str, context: CallContext, now: float) -> CallContext:
        """Hold (merged with what was held for the call); returns what is held now."""
        self._expire(now)
        held = self._held.pop(call_id, None)
        merged = held[0].merged(context) if held is not None else context
        self._held[call_id] = (merged, now)
        while len(self._held) > self.limit:
            del self._held[next(iter(self._held))]
        return merged

    def take(self, call_id: str, now: float) -> CallContext | None:
        """The context held for a call that has just connected, if any (and unexpired)."""
        self._expire(now)
        held = self._held.pop(call_id, None)
        return held[0] if held is not None else None

    def _expire(self, now: float) -> None:
        while self._held:
            call_id, (_, at) = next(iter(self._held.items()))
            if now - at < self.ttl:
                return
            del self._held[call_id]
