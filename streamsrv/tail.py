"""`streamsrv tail`: follow calls from a terminal, through streamsrv.follow (what a call said so
far from its stream, then live from pub/sub, no gaps, no repeats) and streamsrv.tail_view.

When the feed ends this follower (Redis dropped the subscription, or the terminal fell too far
behind), it follows again from the last message it printed, as a browser on /events does: the
replay repeats a few seconds, dropped by (call_id, seq) against what was printed (`seen`).
Writes to stdout are plain blocking writes: a terminal that cannot keep up slows this process,
never the server (at worst the follower is ended and resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from typing import TextIO

from redis.exceptions import RedisError

from streamsrv import events
from streamsrv.config import Settings
from streamsrv.follow import Followed, FollowSources, Message
from streamsrv.tail_view import TailView

RESUME_RECENT = 1000  # on resuming --all: calls that ended while away, at most
RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TailOptions:
    calls: list[str] | None  # None: every running call and those that start later
    recent: int = 0  # with every call: this many that ended last, too
    json: bool = False
    partials: bool = False  # print partials when not on a terminal
    wait: bool = True  # an unknown call: wait for it to connect (else exit 1)


class Tail:
    """Prints the followed calls' messages until every named call has ended (or forever, for
    every call); `run` returns the exit status."""

    def __init__(self, settings: Settings, options: TailOptions, out: TextIO, err: TextIO) -> None:
        self._settings = settings
        self._options = options
        self._out = out
        self._err = err
        terminal = out.isatty()
        self._view = TailView(
            terminal=terminal,
            color=not os.environ.get("NO_COLOR"),  # no-color.org
            show_call=options.calls is None or len(options.calls) > 1,
            partials=options.partials,
        )
        self._waiting = set(options.calls or ())  # named calls not ended yet
        self._last_seq: dict[str, int] = {}  # what was printed: a resume repeats none of it
        self._since: float | None = None  # the last printed message's emitted_at

    @property
    def done(self) -> bool:
        return self._options.calls is not None and not self._waiting

    async def run(self) -> int:
        channels = events.Channels(self._settings.redis_channel_prefix)
        sources = FollowSources(self._settings.redis_url, channels)
        try:
            return await self._follow(sources)
        finally:
            await sources.close()

    async def _follow(self, sources: FollowSources) -> int:
        first = True
        while True:
            try:
                async with sources.following(
                    calls=self._options.calls,
                    since=self._since,
                    recent=self._options.recent if first else RESUME_RECENT,
                    seen=self._last_seq,
                ) as followed:
                    if first and not self._known(followed):
                        return 1
                    first = False
                    await self._print(followed)
                    if self.done:
                        return 0
            except (ConnectionError, RedisError, OSError) as exc:
                if first:
                    self._warn(f"cannot follow calls: Redis: {exc}")
                    return 1
                self._warn(f"lost Redis ({exc}); following again")
                await asyncio.sleep(RETRY_SECONDS)

    def _known(self, followed: Followed) -> bool:
        """Says which named calls the replay found nothing of; False to give up on them."""
        found = {m.call_id for m in followed.replayed}
        unknown = [c for c in self._options.calls or () if c not in found]
        for call_id in unknown:
            if self._options.wait:
                self._warn(f"call {call_id}: not known yet; waiting for it to connect")
            else:
                self._warn(f"call {call_id}: no such call (not running, not kept in Redis)")
        return self._options.wait or not unknown

    async def _print(self, followed: Followed) -> None:
        """The replay, then live messages until the named calls end or the feed ends this
        follower."""
        for kept in followed.replayed:
            self._show(kept)
        while not self.done:
            message = await followed.next()
            if message is None:
                return
            self._show(message)

    def _show(self, message: Message) -> None:
        if message.seq is not None:
            self._since = max(self._since or 0.0, message.emitted_at)
        if self._options.json:
            text = message.raw + "\n"
        else:
            self._view.width = shutil.get_terminal_size().columns
            text = self._view.render(message.data)
        if message.data.get("type") == events.CallEnded.TYPE:
            self._waiting.discard(message.call_id)
        self._write(text)

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()

    def _warn(self, text: str) -> None:
        self._write(self._view.clear())
        print(f"streamsrv tail: {text}", file=self._err, flush=True)

    def finish(self) -> None:
        """Leaves the terminal clean: the partial line erased."""
        with contextlib.suppress(OSError, ValueError):
            self._write(self._view.clear())


async def run_tail(settings: Settings, options: TailOptions) -> int:
    """Runs until done; SIGINT or SIGTERM ends it quietly with status 0."""
    tail = Tail(settings, options, sys.stdout, sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(tail.run(), name="tail")
    stopping = asyncio.create_task(stop.wait(), name="tail-stop")
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        tail.finish()
    return 0 if task.cancelled() else task.result()
