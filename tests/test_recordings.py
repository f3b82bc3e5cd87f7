"""RecordingWriter: exact WAV content, many calls at once, readable mid-call, disk errors."""

from __future__ import annotations

import asyncio
import random
import wave
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamsrv.recordings import RecordingWriter


def read_wav(path: Path) -> tuple[int, int, int, bytes]:
    with wave.open(str(path), "rb") as wav:
        frames = wav.readframes(wav.getnframes())
        return wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), frames


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[RecordingWriter]:
    writer = RecordingWriter(tmp_path / "recordings")
    writer.start()
    yield writer
    await writer.close()


async def test_content_equals_bytes_written(writer: RecordingWriter, tmp_path: Path) -> None:
    recording = writer.open("c0ffee00-0000-4000-8000-000000000001", 8000)
    day = datetime.now(UTC).strftime("%Y/%m/%d")
    assert recording.path == tmp_path / "recordings" / day / f"{recording.call_id}.wav"
    rng = random.Random(1)
    chunks = [rng.randbytes(320) for _ in range(200)]
    for chunk in chunks:
        recording.write(chunk)
    path = await recording.finish()
    assert path == recording.path and recording.error is None
    assert recording.frames_bytes == 320 * 200
    assert read_wav(path) == (1, 2, 8000, b"".join(chunks))
    assert path.stat().st_size == 44 + 320 * 200


async def test_many_calls_in_parallel(writer: RecordingWriter) -> None:
    rng = random.Random(2)
    recordings = [writer.open(f"call-{i}", 16000) for i in range(40)]
    expected: dict[str, bytearray] = {r.call_id: bytearray() for r in recordings}
    for _ in range(50):
        for recording in rng.sample(recordings, len(recordings)):
            chunk = rng.randbytes(2 * rng.randrange(1, 400))
            recording.write(chunk)
            expected[recording.call_id] += chunk
        await asyncio.sleep(0)
    paths = await asyncio.gather(*(r.finish() for r in recordings))
    for recording, path in zip(recordings, paths, strict=True):
        assert read_wav(path) == (1, 2, 16000, bytes(expected[recording.call_id]))


async def test_header_valid_mid_call(writer: RecordingWriter) -> None:
    recording = writer.open("midcall", 8000)
    recording.write(b"\x01\x02" * 1000)
    await recording.flush()
    assert read_wav(recording.path)[3] == b"\x01\x02" * 1000
    recording.write(b"\x03\x04" * 500)
    await recording.flush()
    assert read_wav(recording.path)[3] == b"\x01\x02" * 1000 + b"\x03\x04" * 500
    await recording.finish()


async def test_close_finishes_open_recordings(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path)
    writer.start()
    recording = writer.open("unfinished", 8000)
    recording.write(b"\x05\x06" * 100)
    await writer.close()
    assert read_wav(recording.path)[3] == b"\x05\x06" * 100
    recording.write(b"late")  # dropped, no error
    assert await recording.finish() == recording.path


async def test_unwritable_directory_sets_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")  # mkdir below a regular file fails, even for root
    writer = RecordingWriter(blocker)
    writer.start()
    try:
        recording = writer.open("doomed", 8000)
        recording.write(b"\x00\x00" * 10)
        await recording.flush()
        assert recording.error is not None
        recording.write(b"\x00\x00" * 10)  # dropped silently after the error
        assert recording.frames_bytes == 20
        assert await recording.finish() == recording.path
        assert not recording.path.exists()
    finally:
        await writer.close()


async def test_rejects_path_like_call_ids(writer: RecordingWriter) -> None:
    with pytest.raises(ValueError):
        writer.open("../escape", 8000)
