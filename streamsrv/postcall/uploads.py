"""POST /audio/process: recordings that did not come over AudioSocket join the post-call queue.

The multipart body is streamed to a temporary file (never held in memory, never more than
MAX_UPLOAD_BYTES), then decoded with PyAV, whatever its format, into the 16 kHz mono 16-bit WAV
that the worker reads, stored where live calls' recordings go (RECORDINGS_DIR/YYYY/MM/DD/<id>.wav).
Only then are the call (ended, postcall_only, peer "upload") and its job written, in one
transaction. Every bad upload is answered 4xx with {"error": ...} and leaves no file and no row.
Disk writes and decoding run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
import wave
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from aiohttp import BodyPartReader, web

from streamsrv.config import Settings
from streamsrv.context import whisper_languages
from streamsrv.jobs import JobStore
from streamsrv.recordings import fsync_directory, recording_path

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16000
MAX_DECODED_SECONDS = 6 * 3600  # a small file must not decode into an unbounded one
MAX_FIELD_BYTES = 64
PRIORITY_RANGE = (-1000, 1000)
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields, on top of the file
CHUNK = 1 << 20


class UploadError(Exception):
    """A bad upload: the HTTP status and the message for {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    temp: Path
    size: int
    language: str | None
    priority: int


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def handle_upload(request: web.Request, settings: Settings, store: JobStore) -> web.Response:
    """The whole request: receive, decode, store, queue; 202 {"call_id", "job_id"}."""
    try:
        upload = await receive(request, settings)
    except UploadError as exc:
        return error_response(exc.status, exc.message)
    call_id = str(uuid.uuid4())
    received = datetime.now(UTC)
    path = recording_path(settings.recordings_dir, call_id, received)
    try:
        seconds = await asyncio.to_thread(decode_to_wav, upload.temp, path)
    except UploadError as exc:
        return error_response(exc.status, exc.message)
    except OSError as exc:  # the disk, not the upload: full, read-only, permissions
        log.error("upload_not_stored", call_id=call_id, error=repr(exc))
        return error_response(500, "the recording could not be stored")
    finally:
        await asyncio.to_thread(upload.temp.unlink, missing_ok=True)
    try:
        job_id = await store.calls.create_upload(
            call_id, received, seconds, str(path), upload.priority, upload.language
        )
    except Exception as exc:  # Postgres away or failing: the recording must not stay behind
        await asyncio.to_thread(path.unlink, missing_ok=True)
        log.error("upload_not_queued", call_id=call_id, error=repr(exc))
        return error_response(503, "the job could not be queued (database unavailable)")
    log.info(
        "upload_queued",
        call_id=call_id,
        job_id=job_id,
        bytes=upload.size,
        audio_seconds=round(seconds, 3),
        priority=upload.priority,
    )
    return web.json_response(
        {"call_id": call_id, "job_id": job_id},
        status=202,
        headers={"Location": f"/calls/{call_id}"},
    )


async def receive(request: web.Request, settings: Settings) -> Upload:
    """Read the form: the `audio` file into a temporary file, `language` and `priority`."""
    limit = settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD:
        raise UploadError(413, f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)")
    if request.content_type != "multipart/form-data":
        raise UploadError(400, "expected a multipart/form-data body with an `audio` file field")
    fields: dict[str, str] = {}
    temp: Path | None = None
    size = 0
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise UploadError(400, "nested multipart bodies are not accepted")
            if part.name == "audio":
                if temp is not None:
                    raise UploadError(400, "more than one `audio` field")
                temp = await asyncio.to_thread(_temp_path, settings.recordings_dir)
                size = await _save(part, temp, limit)
            elif part.name in ("language", "priority"):
                fields[part.name] = await _read_field(part)
        if temp is None:
            raise UploadError(400, "missing the `audio` file field")
        if size == 0:
            raise UploadError(400, "the audio file is empty")
        return Upload(temp, size, _language(fields.get("language")), _priority(fields))
    except BaseException as exc:
        if temp is not None:
            await asyncio.shield(asyncio.to_thread(temp.unlink, missing_ok=True))
        if isinstance(exc, ValueError | AssertionError):  # aiohttp: a malformed body
            raise UploadError(400, f"malformed multipart body: {exc}") from exc
        raise


def _temp_path(recordings_dir: Path) -> Path:
    incoming = recordings_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    return incoming / f"{uuid.uuid4().hex}.upload"


async def _save(part: BodyPartReader, temp: Path, limit: int) -> int:
    """Stream the part into temp; UploadError(413) past `limit` bytes."""
    file: BinaryIO = await asyncio.to_thread(temp.open, "wb")
    size = 0
    try:
        pending = bytearray()
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > limit:
                raise UploadError(413, f"the audio file is larger than MAX_UPLOAD_BYTES ({limit})")
            pending += chunk
            if len(pending) >= CHUNK:
                await asyncio.to_thread(file.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(file.write, bytes(pending))
    finally:
        await asyncio.to_thread(file.close)
    return size


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES + 1):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise UploadError(400, f"the `{part.name}` field is too long")
    return data.decode("utf-8", errors="replace").strip()


def _language(value: str | None) -> str | None:
    """A Whisper language code, or None (empty or `auto`: LANGUAGE, then detection)."""
    if not value or value == "auto":
        return None
    if value not in whisper_languages():
        raise UploadError(400, f"`language` {value!r} is not a Whisper language code or auto")
    return value


def _priority(fields: dict[str, str]) -> int:
    low, high = PRIORITY_RANGE
    text = fields.get("priority", "").strip()
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = high + 1
    if not low <= value <= high:
        raise UploadError(400, f"`priority` must be an integer from {low} to {high}")
    return value


def decode_to_wav(source: Path, target: Path) -> float:
    """Decode any audio PyAV reads into a 16 kHz mono 16-bit WAV at target, written under a
    temporary name, fsynced, then renamed; returns its seconds. UploadError when the file is not
    audio (415) or holds none (422); target is then absent."""
    import av

    partial = target.with_name(f".{target.name}.part")
    samples = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with av.open(str(source), metadata_errors="ignore") as container:
                if not container.streams.audio:
                    raise UploadError(415, "the file has no audio stream")
                with partial.open("wb") as raw:
                    with wave.open(raw, "wb") as out:  # closing it writes the final sizes
                        out.setnchannels(1)
                        out.setsampwidth(2)
                        out.setframerate(SAMPLE_RATE)
                        samples = _transcode(container, out)
                    raw.flush()
                    os.fsync(raw.fileno())
        except av.FFmpegError as exc:
            raise UploadError(415, f"not an audio file that can be decoded ({exc})") from exc
        if samples == 0:
            raise UploadError(422, "the file holds no audio samples")
        partial.rename(target)
        fsync_directory(target.parent)
    finally:
        partial.unlink(missing_ok=True)
    return samples / SAMPLE_RATE


def _transcode(container: Any, out: wave.Wave_write) -> int:
    """Resample the first audio stream into out; returns the samples written. A stream that
    turns corrupt part-way is kept up to there (as faster_whisper.decode_audio does)."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    samples = 0

    def write(frames: list[Any]) -> None:
        nonlocal samples
        for frame in frames:
            pcm = frame.to_ndarray().reshape(-1).astype("<i2")
            out.writeframesraw(pcm.tobytes())
            samples += len(pcm)
        if samples > MAX_DECODED_SECONDS * SAMPLE_RATE:
            raise UploadError(413, f"the audio is longer than {MAX_DECODED_SECONDS} seconds")

    with contextlib.suppress(av.error.InvalidDataError):
        for frame in container.decode(audio=0):
            write(resampler.resample(frame))
    write(resampler.resample(None))
    return samples
