"""Faults that happen in production, each caused for real: Redis and Postgres stopped and started
again mid-call, streamsrv killed with SIGKILL and restarted, an unwritable recordings directory,
a drain that runs out of time. No call and no audio may be lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
import wave
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from streamsrv import corpus
from streamsrv.config import Settings
from streamsrv.journal import read_journal
from streamsrv.simulate import play_call
from tests.conftest import SERVICES_SH, read_env_file
from tests.e2e import (
    Collector,
    call_and_job,
    free_port,
    get,
    make_settings,
    recording_path,
    running_server,
)
from tests.serverproc import server_process, subprocess_settings
from tests.test_e2e import check_order

pytestmark = pytest.mark.e2e


class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )

    async def wait_up(self) -> None:
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    return
                except OSError:
                    await asyncio.sleep(0.05)
                except aioredis.ConnectionError:
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise AssertionError("private redis did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class PrivatePostgres:
    """A cluster of our own (scripts/services.sh), so the test can stop and start it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/streamsrv",
        }

    def up(self) -> str:
        subprocess.run(
            [str(SERVICES_SH), "up", str(self.state)],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return read_env_file(self.state / "services.env")["DATABASE_URL"]

    def _pg_ctl(self, *args: str) -> None:
        home = (self.state / "pg").resolve()
        pg_ctl = next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        command = [str(pg_ctl), *args, "-D", str(home / "data"), "-w"]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def start(self, port: int) -> None:
        home = (self.state / "pg").resolve()
        self._pg_ctl("start", "-o", f"-p {port}", "-l", str(home / "postgres.log"))

    def purge(self) -> None:
        subprocess.run(
            [str(SERVICES_SH), "purge", str(self.state)],
            env=self.env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


async def test_redis_down_mid_call(settings_env, tmp_path):
    """Calls go on while Redis is away; the finals made meanwhile arrive when it returns, in
    order, once; stale partials are not replayed."""
    redis = PrivateRedis(tmp_path)
    redis.start()
    await redis.wait_up()
    settings = make_settings(settings_env, REDIS_URL=redis.url)
    call = corpus.build_call(corpus.pick_prompts(6, 51), pause=1.0)
    call_id = str(uuid.uuid4())
    before: list[dict[str, Any]] = []
    try:
        async with running_server(settings) as server:
            first = Collector(settings)
            await first.__aenter__()
            playing = asyncio.create_task(
                play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=2)
            )
            await asyncio.sleep(3)
            redis.kill()
            before = list(first.by_call[call_id])
            await asyncio.sleep(5)  # audio and finals go on while Redis is away
            assert server.publisher.status == "down"
            status, body = await get(server.http_port, "/health")
            assert status == 200 and json.loads(body)["status"] == "degraded"
            redis.start()
            await redis.wait_up()
            async with Collector(settings) as after:
                await playing
                await after.wait_ended([call_id], within=60)
            await first.__aexit__()
    finally:
        redis.kill()
    later = after.by_call[call_id]
    messages = before + later
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(set(seqs)), "a message was published twice or out of order"
    finals = [m["segment"] for m in messages if m["type"] == "final"]
    assert finals == list(range(len(call.utterances)))  # none lost, none twice
    # finals made while Redis was away came after it returned
    assert any(m["type"] == "final" for m in later[:-1])
    # a replayed partial would be one whose segment's final came before it, or one older than
    # the newest partial already delivered for its segment
    done: set[int] = set()
    for m in later:
        if m["type"] == "final":
            done.add(m["segment"])
        assert not (m["type"] == "partial" and m["segment"] in done)
    assert later[-1]["type"] == "call_ended" and later[-1]["segments"] == len(finals)
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.readframes(w.getnframes()) == call.pcm


@pytest.mark.parametrize("outage", [5.0, 60.0])
async def test_postgres_down_spools_then_writes_once(settings_env, tmp_path, outage):
    """Writes made while Postgres is away land within 5 s of it accepting connections again,
    in order and once, after a short outage and a long one."""
    pg = PrivatePostgres(tmp_path / "pg-state")
    try:
        url = pg.up()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        settings = make_settings(settings_env, DATABASE_URL=url)
        calls = [corpus.build_call(corpus.pick_prompts(2, s), pause=0.8) for s in (61, 62)]
        ids = [str(uuid.uuid4()) for _ in calls]
        async with running_server(settings) as server, Collector(settings) as collected:
            pg.stop()
            stopped = time.monotonic()
            await asyncio.gather(
                *(
                    play_call("127.0.0.1", server.audiosocket_port, c.pcm, call_id=i, speed=4)
                    for c, i in zip(calls, ids, strict=True)
                )
            )
            await collected.wait_ended(ids)
            status, body = await get(server.http_port, "/health")
            health = json.loads(body)
            assert status == 200 and health["status"] == "degraded"
            # per call: its row at start, then its end row with its job (one write)
            assert health["postgres"] == "down" and health["spooled_writes"] == 4
            assert len(list((settings.spool_dir / "pending").glob("*.json"))) == 4
            for call_id in ids:
                ended = collected.by_call[call_id][-1]
                assert ended["type"] == "call_ended" and ended["job_id"] is None
                assert any(m["type"] == "final" for m in collected.by_call[call_id])
            await asyncio.sleep(max(0.0, stopped + outage - time.monotonic()))
            pg.start(port)  # returns once Postgres accepts connections
            accepting = time.monotonic()
            for _ in range(600):
                if not server.store.spooled:
                    break
                await asyncio.sleep(0.05)
            landed = time.monotonic() - accepting
            print(f"after {outage:.0f} s away, the spool landed {landed:.2f} s after Postgres")
            assert server.store.spooled == 0
            assert landed < 5.0
            status, body = await get(server.http_port, "/health")
            assert json.loads(body)["postgres"] == "ok"
        assert not list((settings.spool_dir / "pending").glob("*.json"))
        assert not read_journal(settings.spool_dir / "journal")
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "select c.call_id, c.status, c.live_transcript, j.status as job, j.audio_path "
                "from calls c join postcall_jobs j using (call_id)"
            )
            jobs = await conn.fetchval("select count(*) from postcall_jobs")
        finally:
            await conn.close()
        assert jobs == 2
        by_id = {str(r["call_id"]): r for r in rows}
        assert set(by_id) == set(ids)
        for call_id in ids:
            row = by_id[call_id]
            assert (row["status"], row["job"]) == ("ended", "queued")
            assert row["audio_path"] == str(recording_path(settings, call_id))
            finals = [m["text"] for m in collected.by_call[call_id] if m["type"] == "final"]
            assert row["live_transcript"] == " ".join(finals)
    finally:
        pg.purge()


async def test_sigkill_mid_call_then_restart_closes_the_call_out(settings_env, database_url):
    settings, env = subprocess_settings(settings_env, DEFAULT_PROCESSING_MODE="postcall_only")
    call = corpus.build_call(corpus.pick_prompts(6, 71), pause=1.0)
    call_id = str(uuid.uuid4())
    async with server_process(env) as server:
        playing = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=1)
        )
        await asyncio.sleep(3)
        server.send_signal(signal.SIGKILL)
        await server.wait(10)
        with pytest.raises(OSError):
            await playing  # Asterisk sees the socket die
    assert call_id in read_journal(settings.spool_dir / "journal")
    async with Collector(settings) as collected, server_process(env):
        await collected.wait_ended([call_id], within=20)
    ended = collected.by_call[call_id][-1]
    assert ended["reason"] == "interrupted"
    assert call_id not in read_journal(settings.spool_dir / "journal")
    with wave.open(str(recording_path(settings, call_id))) as w:
        recorded = w.readframes(w.getnframes())
    assert len(recorded) > 8000 * 2 * 1.5  # some seconds of audio reached the disk
    assert call.pcm.startswith(recorded)  # and it is exactly what was sent
    row = await call_and_job(database_url, call_id)
    assert row is not None and (row["status"], row["job"]) == ("interrupted", "queued")
    assert ended["job_id"] == row["id"]


async def play_then_health(
    settings: Settings, call: corpus.RecordedCall, call_id: str
) -> tuple[int, dict[str, Any]]:
    """Play `call` into an in-process server and check its live transcript is whole (every
    utterance has its final, messages in order); then /health's status and body."""
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=4)
        await collected.wait_ended([call_id])
        status, body = await get(server.http_port, "/health")
    messages = collected.by_call[call_id]
    check_order(messages, call_id)
    assert sum(m["type"] == "final" for m in messages) == len(call.utterances)
    return status, json.loads(body)


async def test_unwritable_recordings_dir_keeps_live_transcription(settings_env, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the recordings directory should be")
    settings = make_settings(settings_env, RECORDINGS_DIR=str(blocked))
    call = corpus.build_call(corpus.pick_prompts(2, 81), pause=0.8)
    call_id = str(uuid.uuid4())
    status, health = await play_then_health(settings, call, call_id)
    assert status == 200 and health["status"] == "degraded"
    assert "not-a-directory" in health["recordings"]


async def test_drain_timeout_ends_calls_as_interrupted_still_recorded(settings_env, database_url):
    settings, env = subprocess_settings(
        settings_env, DRAIN_TIMEOUT="1", DEFAULT_PROCESSING_MODE="postcall_only"
    )
    call = corpus.build_call(corpus.pick_prompts(4, 91), pause=1.0)
    call_id = str(uuid.uuid4())
    async with server_process(env) as server, Collector(settings) as collected:
        playing = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=1)
        )
        await asyncio.sleep(2)
        server.send_signal(signal.SIGTERM)
        code = await server.wait(20)
        await collected.wait_ended([call_id], within=10)
        playing.cancel()
    assert code == 0
    assert collected.by_call[call_id][-1]["reason"] == "shutdown"
    with wave.open(str(recording_path(settings, call_id))) as w:
        recorded = w.readframes(w.getnframes())
    assert len(recorded) > 8000 * 2 * 2.5 and call.pcm.startswith(recorded)
    row = await call_and_job(database_url, call_id)
    assert row is not None and (row["status"], row["job"]) == ("interrupted", "queued")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 128 KiB tmpfs: a recordings directory that really fills up mid-call."""
    mountpoint = tmp_path / "tiny-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_disk_full_mid_call_keeps_live_transcription(settings_env, tiny_disk):
    settings = make_settings(settings_env, RECORDINGS_DIR=str(tiny_disk))
    call = corpus.build_call(corpus.pick_prompts(5, 82), pause=0.8)
    assert len(call.pcm) > 2 * 128 * 1024  # more audio than the disk holds
    call_id = str(uuid.uuid4())
    status, health = await play_then_health(settings, call, call_id)
    assert status == 200 and health["status"] == "degraded"
    assert "No space left" in health["recordings"]
    # what reached the disk before it filled is a readable WAV of exactly the audio sent
    with wave.open(str(recording_path(settings, call_id))) as w:
        recorded = w.readframes(w.getnframes())
    assert 0 < len(recorded) < len(call.pcm) and call.pcm.startswith(recorded)


async def test_secrets_in_urls_never_reach_the_logs(settings_env):
    """Redis and Postgres both unreachable at start, with passwords in their URLs: the server
    still starts degraded (taking calls, spooling), and no log line carries a password."""
    _, env = subprocess_settings(
        settings_env,
        DEFAULT_PROCESSING_MODE="postcall_only",
        REDIS_URL=f"redis://:redis-s3cret@127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgresql://streamsrv:pg-s3cret@127.0.0.1:{free_port()}/streamsrv",
    )
    async with server_process(env) as server:
        status, body = await server.get("/health")
        call = corpus.build_call(corpus.pick_prompts(1, 99), pause=0.5)
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, speed=8)
        await asyncio.sleep(1.5)  # a retry or two of both
    health = json.loads(body)
    assert status == 200  # still taking calls
    assert (health["status"], health["redis"], health["postgres"]) == ("degraded", "down", "down")
    logs = "\n".join(server.lines)
    assert "redis_down" in logs and "postgres_unavailable" in logs
    assert "s3cret" not in logs
