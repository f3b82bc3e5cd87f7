"""POST /audio/process and GET /calls/<id> on a real server (postcall_only: no live model),
real Postgres and Redis; the uploaded recordings then go through a real worker."""

from __future__ import annotations

import uuid
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from streamsrv import corpus
from streamsrv.config import Settings
from streamsrv.server import Server
from streamsrv.wer import wer
from tests.e2e import make_settings, running_server
from tests.postcall_helpers import drain, flac_bytes, fresh_db, shared_model, wav_bytes

__all__ = ["fresh_db"]  # a fixture, used by name


async def post_audio(
    server: Server,
    audio: bytes | None,
    *,
    filename: str = "call.wav",
    **fields: str,
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    if audio is not None:
        form.add_field("audio", audio, filename=filename, content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(name, value)
    url = f"http://127.0.0.1:{server.http_port}/audio/process"
    async with aiohttp.ClientSession() as session, session.post(url, data=form) as response:
        return response.status, await response.json()


async def get_call(server: Server, call_id: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{server.http_port}/calls/{call_id}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(fresh_db)
    yield conn
    await conn.close()


def stored_files(settings: Settings) -> list[Path]:
    root = Path(settings.recordings_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def test_uploads_are_stored_queued_and_processed(
    settings_env: dict[str, str], fresh_db: str, db: Any, model_dir: Path
) -> None:
    settings = make_settings(
        settings_env, DATABASE_URL=fresh_db, DEFAULT_PROCESSING_MODE="postcall_only"
    )
    calls = [corpus.build_call(corpus.pick_prompts(2, seed), pause=0.8) for seed in (41, 42)]
    uploads = [
        (wav_bytes(calls[0].pcm, corpus.RATE), "call.wav", {"priority": "3"}),
        (flac_bytes(calls[1].pcm, corpus.RATE), "call.flac", {"language": "en"}),
    ]
    async with running_server(settings) as server:
        answers = [
            await post_audio(server, data, filename=name, **fields)
            for data, name, fields in uploads
        ]
        assert [status for status, _ in answers] == [202, 202]
        ids = [body["call_id"] for _, body in answers]

        for (_, body), call, (_, _, fields) in zip(answers, calls, uploads, strict=True):
            row = await db.fetchrow(
                "select c.*, j.id as job_id, j.status as job_status, j.priority, j.language"
                " as job_language, j.audio_path from calls c join postcall_jobs j using (call_id)"
                " where call_id = $1",
                uuid.UUID(body["call_id"]),
            )
            assert row["job_id"] == body["job_id"]
            assert (row["status"], row["processing_mode"], row["peer"]) == (
                "ended",
                "postcall_only",
                "upload",
            )
            assert (row["sample_rate"], row["job_status"]) == (16000, "queued")
            assert row["priority"] == int(fields.get("priority", 0))
            assert row["job_language"] == fields.get("language")
            assert row["duration_s"] == pytest.approx(call.seconds, abs=0.05)
            path = Path(row["audio_path"])
            assert (
                path.is_relative_to(settings.recordings_dir)
                and path.name == f"{row['call_id']}.wav"
            )
            with wave.open(str(path)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                assert w.getnframes() / 16000 == pytest.approx(call.seconds, abs=0.05)

            status, view = await get_call(server, body["call_id"])
            assert status == 200
            assert view["call_id"] == body["call_id"] and view["peer"] == "upload"
            assert view["live_transcript"] == ""
            assert view["job"]["status"] == "queued" and view["job"]["id"] == body["job_id"]
            assert view["results"] is None
        assert not [p for p in stored_files(settings) if p.suffix != ".wav"]

        await drain(settings, shared_model(model_dir))

        for call_id, call in zip(ids, calls, strict=True):
            status, view = await get_call(server, call_id)
            assert status == 200
            assert view["job"]["status"] == "done" and view["job"]["attempts"] == 1
            results = view["results"]
            assert wer(call.reference, results["transcript"]) < 0.2, results["transcript"]
            assert results["language"] == "en"
            assert results["segments"] and results["segments"][0]["words"]
            assert results["insights"]["speech_segments"] >= 1
            assert results["timings"]["audio_seconds"] == pytest.approx(call.seconds, abs=0.05)

        for unknown in (str(uuid.uuid4()), "not-a-call"):
            status, body = await get_call(server, unknown)
            assert status == 404 and body["error"]


async def test_bad_uploads_are_refused_and_leave_nothing(
    settings_env: dict[str, str], fresh_db: str, db: Any
) -> None:
    limit = 40_000
    settings = make_settings(
        settings_env,
        DATABASE_URL=fresh_db,
        DEFAULT_PROCESSING_MODE="postcall_only",
        MAX_UPLOAD_BYTES=str(limit),
    )
    small = wav_bytes(corpus.build_call(corpus.pick_prompts(1, 3), pause=0.2).pcm[:16000], 8000)
    cases: list[tuple[str, bytes | None, dict[str, str], int]] = [
        ("garbage", b"this is not a recording at all\n" * 50, {}, 415),
        ("empty", b"", {}, 400),
        ("missing field", None, {"priority": "1"}, 400),
        ("too large", wav_bytes(b"\x01\x00" * limit, 8000), {}, 413),
        ("no samples", wav_bytes(b"", 8000), {}, 422),
        ("bad priority", small, {"priority": "urgent"}, 400),
        ("priority out of range", small, {"priority": "99999999999"}, 400),
        ("bad language", small, {"language": "english"}, 400),
    ]
    async with running_server(settings) as server:
        for name, audio, fields, expected in cases:
            status, body = await post_audio(server, audio, **fields)
            assert (name, status) == (name, expected), body
            assert isinstance(body["error"], str) and body["error"], name

        url = f"http://127.0.0.1:{server.http_port}/audio/process"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=small) as response:  # not a form
                assert response.status == 400
                assert "multipart" in (await response.json())["error"]
            async with session.post(url, json={"audio": "x"}) as response:
                assert response.status == 400

        assert stored_files(settings) == []
        assert await db.fetchval("select count(*) from calls") == 0
        assert await db.fetchval("select count(*) from postcall_jobs") == 0

        # and the same server still takes a good one
        status, body = await post_audio(server, small)
        assert status == 202, body
        assert len(stored_files(settings)) == 1
        assert body.keys() == {"call_id", "job_id"}
