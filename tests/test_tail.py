"""`streamsrv tail` as a user runs it: a real subprocess, its stdout a pseudo-terminal (or a
pipe), following calls of a real server through a real Redis. Most tests publish through the
server's own Publisher (no model, quick); one plays recorded prompts into the real model."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import struct
import sys
import termios
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from streamsrv import corpus, events
from streamsrv.config import Settings
from streamsrv.simulate import play_call
from streamsrv.tail_view import DIM, ERASE, RESET
from tests.e2e import Collector, make_settings, running_server
from tests.test_events_feed import NO_MODEL, Emitter, ended, final, partial, started

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 500  # wide enough that no partial of a recorded prompt is clipped


class TailProcess:
    """`python -m streamsrv.cli tail ...`, stdout on a pty (a terminal COLUMNS wide) or a pipe;
    everything it writes, kept."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int | None) -> None:
        self.proc = proc
        self._master = master
        self._out = bytearray()
        self._err = bytearray()
        self._eof = asyncio.Event()
        self._readers = [asyncio.create_task(self._read_err())]
        if master is None:
            self._readers.append(asyncio.create_task(self._read_pipe()))
        else:
            asyncio.get_running_loop().add_reader(master, self._read_pty)

    @property
    def out(self) -> str:
        """stdout as written (a terminal's own \\r before each \\n taken out)."""
        return self._out.decode(errors="replace").replace("\r\n", "\n")

    @property
    def err(self) -> str:
        return self._err.decode(errors="replace")

    def _read_pty(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            data = b""
        if data:
            self._out += data
        else:
            asyncio.get_running_loop().remove_reader(self._master)
            self._eof.set()

    async def _read_pipe(self) -> None:
        assert self.proc.stdout is not None
        while data := await self.proc.stdout.read(65536):
            self._out += data
        self._eof.set()

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while data := await self.proc.stderr.read(65536):
            self._err += data

    async def until(self, seen: Callable[[TailProcess], bool], within: float = 30.0) -> None:
        async def poll() -> None:
            while not seen(self):
                if self.proc.returncode is not None:
                    raise AssertionError(f"tail exited {self.proc.returncode}: {self.err}")
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), within)

    async def exit_status(self, within: float = 30.0) -> int:
        status = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.wait_for(self._eof.wait(), 10)
        await asyncio.gather(*self._readers)
        return status

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for task in self._readers:
            task.cancel()
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            os.close(self._master)


@contextlib.asynccontextmanager
async def tail(
    settings: Settings, *args: str, terminal: bool = True, env_file: Path | None = None
) -> AsyncIterator[TailProcess]:
    """A running tail of the test's Redis and prefix (from the environment, or from the env
    file when given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env["REDIS_URL"] = settings.redis_url
    if env_file is None:
        env["REDIS_CHANNEL_PREFIX"] = settings.redis_channel_prefix
    else:
        env.pop("REDIS_CHANNEL_PREFIX", None)
        args = (*args, "--env-file", str(env_file))
    master = slave = None
    if terminal:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamsrv.cli", "tail", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=slave if slave is not None else asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    if slave is not None:
        os.close(slave)  # the child holds it: the master reads EOF (EIO) once it exits
    process = TailProcess(proc, master)
    try:
        yield process
    finally:
        await process.close()


def final_lines(out: str) -> list[str]:
    """The permanent lines: what each \\n ends, less any partial drawn before it, unstyled."""
    return [
        re.sub(r"\x1b\[[0-9;]*m", "", line.rsplit(ERASE, 1)[-1]) for line in out.split("\n")[:-1]
    ]


async def test_a_call_is_replayed_then_followed_live_with_its_partial_redrawn_in_place(
    settings_env,
):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id, {"role": "caller"}), final(a.call_id, 0, "hello there"))
        async with tail(settings, a.call_id) as t:
            await t.until(lambda t: "hello there" in t.out)
            await a.emit(partial(a.call_id, 1, "how can"))
            await t.until(lambda t: "how can" in t.out)  # each drawn before the next comes
            await a.emit(partial(a.call_id, 1, "how can I"))
            await t.until(lambda t: "how can I" in t.out)
            await a.emit(final(a.call_id, 1, "How can I help?"))
            await a.emit(events.Dtmf(call_id=a.call_id, digit="3", at=2.0), ended(a.call_id))
            status = await t.exit_status()
    assert status == 0
    assert t.err == ""
    out = t.out
    assert final_lines(out) == [
        "0:00 caller  call started from 127.0.0.1:1",
        "0:00 caller/en  hello there",
        "0:01 caller/en  How can I help?",
        "0:02 caller/en  DTMF 3",
        "0:03 caller/en  call ended: hangup, 0:03, 2 segments",
    ]
    drawn = out.index(ERASE + DIM + "0:01 caller/en  how can" + RESET)  # on the last line
    redrawn = out.index(ERASE + DIM + "0:01 caller/en  how can I" + RESET, drawn + 1)
    replaced = out.index(ERASE + "0:01 caller/en  How can I help?\n")
    assert drawn < redrawn < replaced
    assert "\n" not in out[drawn:replaced]  # in place: the partial never took a line of its own


async def test_json_lines_are_the_messages_as_published(settings_env, tmp_path):
    settings = make_settings(settings_env, **NO_MODEL)
    env_file = tmp_path / "streamsrv.env"
    env_file.write_text(f"REDIS_CHANNEL_PREFIX={settings.redis_channel_prefix}\n")
    async with running_server(settings) as server, Collector(settings) as collected:
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id), final(a.call_id, 0, "said before"))
        async with tail(settings, a.call_id, "--json", terminal=False, env_file=env_file) as t:
            await t.until(lambda t: "said before" in t.out)
            await a.emit(partial(a.call_id, 1, "and no"), final(a.call_id, 1, "and now"))
            await a.emit(ended(a.call_id))
            status = await t.exit_status()
    assert status == 0
    printed = [json.loads(line) for line in t.out.splitlines()]
    assert printed == collected.by_call[a.call_id]
    assert [m["type"] for m in printed] == [
        "call_started",
        "final",
        "partial",
        "final",
        "call_ended",
    ]


async def test_every_call_on_a_pipe_plain_lines_without_partials_until_sigterm(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a, b = Emitter(server, str(uuid.uuid4())), Emitter(server, str(uuid.uuid4()))
        for _ in range(2):  # ended calls: only the last is asked for
            old = Emitter(server, str(uuid.uuid4()))
            await old.emit(started(old.call_id), final(old.call_id, 0, "zero"), ended(old.call_id))
        await a.emit(started(a.call_id, {"role": "agent"}), final(a.call_id, 0, "one"))
        async with tail(settings, "--all", "--recent", "1", terminal=False) as t:
            await t.until(lambda t: "one" in t.out)
            await b.emit(started(b.call_id))  # a call that starts later
            await b.emit(partial(b.call_id, 0, "tw"), final(b.call_id, 0, "two"), ended(b.call_id))
            await a.emit(partial(a.call_id, 1, "thr"), final(a.call_id, 1, "three"))
            await t.until(lambda t: "three" in t.out)
            t.proc.send_signal(signal.SIGTERM)
            status = await t.exit_status()
    assert status == 0
    assert t.err == ""
    assert "\x1b" not in t.out and "\r" not in t.out
    lines = t.out.splitlines()
    short_a, short_b = a.call_id[:8], b.call_id[:8]
    assert [line.split("  ", 1)[1] for line in lines] == [
        "call started from 127.0.0.1:1", "zero", "call ended: hangup, 0:03, 2 segments",
        "call started from 127.0.0.1:1", "one",
        "call started from 127.0.0.1:1", "two", "call ended: hangup, 0:03, 2 segments",
        "three",
    ]  # fmt: skip
    assert lines[0].split()[1] == old.call_id[:8]
    assert lines[4] == f"0:00 {short_a} agent/en  one" and short_b in lines[5]
    assert "tw" not in t.out.split() and "thr" not in t.out.split()  # partials skipped


async def test_an_unknown_call_is_waited_for_or_refused_with_no_wait(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    later = str(uuid.uuid4())
    async with running_server(settings) as server:
        async with tail(settings, later, "--no-wait", terminal=False) as refused:
            assert await refused.exit_status() == 1
        async with tail(settings, later.upper(), terminal=False) as waiting:
            await waiting.until(lambda t: "not known yet" in t.err)
            c = Emitter(server, later)
            await c.emit(started(later), final(later, 0, "here now"), ended(later))
            assert await waiting.exit_status() == 0
        async with tail(settings, "not-a-call", terminal=False) as bad:
            assert await bad.exit_status() == 2
    assert refused.err == (
        f"streamsrv tail: call {later}: no such call (not running, not kept in Redis)\n"
    )
    assert refused.out == ""
    assert "0:00 en  here now" in waiting.out
    assert "not a call id" in bad.err


async def test_sigint_ends_a_tail_quietly_and_leaves_no_partial_on_the_terminal(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id))
        async with tail(settings, a.call_id) as t:
            await t.until(lambda t: "call started" in t.out)
            await a.emit(partial(a.call_id, 0, "half a sente"))
            await t.until(lambda t: "half a sente" in t.out)
            t.proc.send_signal(signal.SIGINT)
            status = await t.exit_status()
    assert status == 0
    assert t.err == ""
    assert t.out.endswith("half a sente\x1b[0m" + ERASE)  # erased on the way out


@pytest.mark.e2e
async def test_a_real_call_followed_from_the_middle_in_a_terminal(settings_env):
    settings = make_settings(settings_env)
    call = corpus.build_call(corpus.pick_prompts(4, 17), pause=1.5)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        player = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id)
        )
        try:
            await asyncio.wait_for(said_something(collected, call_id), 60)
            first = spoken(collected.by_call[call_id])[0]
            async with tail(settings, call_id) as t:
                await t.until(lambda t: "call started" in t.out, within=60)
                replayed = len(collected.by_call[call_id])  # what came later reached tail live
                await t.until(lambda t: first in t.out)
                status = await t.exit_status(within=120)
        finally:
            await player
    assert status == 0
    assert t.err == ""
    published = collected.by_call[call_id]
    texts = spoken(published)
    assert len(texts) >= 3
    shown = [line.split("  ", 1)[1] for line in final_lines(t.out)]
    assert shown[0].startswith("call started from")
    assert shown[-1].startswith("call ended:")
    said = [s for s in shown[1:-1] if not s.startswith(("language ", "context: "))]
    assert said == texts  # what was said before tail started, then live, in order
    # a partial drawn on the last line, redrawn in place, then replaced by its final
    finals = {m["segment"]: m["text"] for m in published if m["type"] == "final"}
    live = [
        m
        for m in published[replayed:]
        if m["type"] == "partial" and finals.get(m["segment"], "").strip()
    ]
    assert live, "no partial of a spoken segment after tail started"
    final_at = t.out.index(finals[live[-1]["segment"]] + "\n")
    partial_at = t.out.rfind(live[-1]["text"] + RESET, 0, final_at)
    drawn_at = t.out.rfind(ERASE + DIM, 0, partial_at)
    assert 0 <= drawn_at < partial_at
    assert "\n" not in t.out[drawn_at:final_at]
    assert t.out.count(ERASE + DIM) >= len(live)  # each partial drawn in place, none as a line


def redis_connections(pid: int, port: int) -> list[str]:
    """host:port of the process's TCP connections to `port` on loopback, as Redis names them."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == port:
            found.append(f"127.0.0.1:{int(local.split(':')[1], 16)}")
    return found


async def test_after_redis_drops_the_tail_it_follows_again_without_gaps_or_repeats(settings_env):
    settings = make_settings(settings_env, **NO_MODEL)
    redis_port = urlsplit(settings.redis_url).port or 6379
    async with running_server(settings) as server:
        a = Emitter(server, str(uuid.uuid4()))
        await a.emit(started(a.call_id), final(a.call_id, 0, "before"))
        async with tail(settings, a.call_id, terminal=False) as t:
            await t.until(lambda t: "before" in t.out)
            admin = aioredis.Redis.from_url(settings.redis_url)
            try:  # what a Redis restart or a network cut does to this one client
                dropped = redis_connections(t.proc.pid, redis_port)
                assert dropped
                for addr in dropped:
                    await admin.execute_command("CLIENT", "KILL", "ADDR", addr)
            finally:
                await admin.aclose()
            await a.emit(final(a.call_id, 1, "while away"))
            await t.until(lambda t: "while away" in t.out)
            await a.emit(final(a.call_id, 2, "after"), ended(a.call_id))
            status = await t.exit_status()
    assert status == 0
    said = [line.split("  ", 1)[1] for line in t.out.splitlines()]
    assert said == [
        "call started from 127.0.0.1:1", "before", "while away", "after",
        "call ended: hangup, 0:03, 2 segments",
    ]  # fmt: skip
    assert "live_feed_lost" in t.err


def spoken(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "final" and m["text"].strip()]


async def said_something(collected: Collector, call_id: str) -> None:
    while not spoken(collected.by_call[call_id]):  # noqa: ASYNC110 (the collector's lists)
        await asyncio.sleep(0.05)
