"""streamsrv commands as real subprocesses for tests: `python -m streamsrv.cli <command>` with
its JSON log lines read from stderr (CliProcess); `streamsrv serve` with its own process (file
limit, memory, event loop), its ports, its resident memory and open descriptors from /proc
(ServerProcess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from streamsrv.config import Settings
from tests.e2e import make_settings

ROOT = Path(__file__).resolve().parent.parent


class CliProcess:
    """One `python -m streamsrv.cli <COMMAND>`, its stderr read as it is written."""

    COMMAND = ""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []  # every line of stderr, as written
        self.logs: list[dict[str, Any]] = []  # every JSON line of stderr, in order
        self.other_lines: list[str] = []  # stderr lines that are not JSON (tracebacks, ...)
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamsrv.cli",
            self.COMMAND,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            try:
                event = json.loads(text)
            except ValueError:
                self.other_lines.append(text)
                continue
            if not isinstance(event, dict):
                self.other_lines.append(text)
                continue
            self.logs.append(event)
            self.logged(event)

    def logged(self, event: dict[str, Any]) -> None:
        """A JSON log line was read (for subclasses that wait on one)."""

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        """The exit status, once the process has ended by itself (TimeoutError after
        `within` s)."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL after `within` s); returns the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), within)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 10)
        assert self.proc.returncode is not None
        return self.proc.returncode


class ServerProcess(CliProcess):
    """One `python -m streamsrv.cli serve`; the ports come from its `listening` log line, so
    AUDIOSOCKET_PORT=0 and HTTP_PORT=0 work without a race for free ports."""

    COMMAND = "serve"

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env)
        self.audiosocket_port = 0
        self.http_port = 0
        self._listening = asyncio.Event()

    async def start(self, within: float = 60.0) -> None:
        await self.spawn()
        assert self.proc is not None
        exited = asyncio.create_task(self.proc.wait())
        listening = asyncio.create_task(self._listening.wait())
        try:
            await asyncio.wait(
                [exited, listening], timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
            listening.cancel()
        if not self._listening.is_set():
            await self.stop()
            raise RuntimeError(f"server did not start: {self.other_lines[-20:]} {self.logs[-5:]}")
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                status, _ = await self.get("/health")
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError("server never answered /health with 200")

    def logged(self, event: dict[str, Any]) -> None:
        if event.get("event") == "listening":
            self.audiosocket_port = int(str(event["audiosocket"]).rsplit(":", 1)[1])
            self.http_port = int(str(event["http"]).rsplit(":", 1)[1])
            self._listening.set()

    async def get(self, path: str, within: float = 10.0) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session,
            session.get(f"http://127.0.0.1:{self.http_port}{path}") as response,
        ):
            return response.status, await response.text()

    def rss_bytes(self) -> int:
        """Resident memory now (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@contextlib.asynccontextmanager
async def server_process(env: dict[str, str], within: float = 60.0) -> AsyncIterator[ServerProcess]:
    """A started server; stopped (SIGTERM, then SIGKILL) on the way out."""
    server = ServerProcess(env)
    try:
        await server.start(within)
        yield server
    finally:
        if server.proc is not None:
            await server.stop()


def subprocess_settings(
    settings_env: dict[str, str], **overrides: str
) -> tuple[Settings, dict[str, str]]:
    """One test's Settings (its own channel prefix) and the environment of a server subprocess
    to match: this process's, the test's settings, ephemeral ports (read back from the log),
    JSON logs, the same channel prefix, then `overrides` in both."""
    settings = make_settings(settings_env, **overrides)
    env = {
        **os.environ,
        **settings_env,
        "AUDIOSOCKET_PORT": "0",
        "HTTP_PORT": "0",
        "LOG_FORMAT": "json",
        "REDIS_CHANNEL_PREFIX": settings.redis_channel_prefix,
        **overrides,
    }
    return settings, env
