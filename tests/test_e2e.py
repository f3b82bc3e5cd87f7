"""End to end: simulated Asterisk calls of real recorded speech through a real server, the real
bundled model, real Redis and Postgres. Calls are paced faster than real time, which only adds
load: the server's decisions follow the audio's own clock."""

from __future__ import annotations

import asyncio
import audioop
import uuid
import wave
from typing import Any

import asyncpg
import numpy as np
import pytest
import soxr

from streamsrv import audiosocket as aso
from streamsrv import corpus
from streamsrv.simulate import play_call
from streamsrv.wer import corpus_wer
from tests.e2e import Collector, make_settings, recording_path, running_server

pytestmark = pytest.mark.e2e

SPEED = 2.0


def check_order(messages: list[dict[str, Any]], call_id: str) -> None:
    """The Redis contract: started first, ended last, seq 1.. without gaps, segments in order,
    a partial never after its segment's final, each final once."""
    assert messages[0]["type"] == "call_started"
    assert messages[-1]["type"] == "call_ended"
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert all(m["call_id"] == call_id for m in messages)
    times = [m["emitted_at"] for m in messages]
    assert times == sorted(times)
    finals_seen: list[int] = []
    for m in messages:
        if m["type"] in ("partial", "final"):
            assert m["segment"] not in finals_seen, f"{m['type']} after final: {m}"
            assert m["start"] < m["end"]
        if m["type"] == "partial":
            assert m["end"] <= m["audio_end"]
        if m["type"] == "final":
            finals_seen.append(m["segment"])
    assert finals_seen == list(range(len(finals_seen)))
    assert messages[-1]["segments"] == len(finals_seen)


async def test_concurrent_calls_transcribed_recorded_and_queued(settings_env, database_url):
    settings = make_settings(settings_env)
    calls = [
        corpus.build_call(corpus.pick_prompts(5, seed), pause=1.0, noise=30.0, seed=seed)
        for seed in (11, 12, 13, 14)
    ]
    ids = [str(uuid.uuid4()) for _ in calls]
    dtmf = {ids[0]: [(2.0, "1"), (3.0, "#")], ids[2]: [(5.5, "9")]}
    async with running_server(settings) as server, Collector(settings) as collected:
        played = await asyncio.gather(
            *(
                play_call(
                    "127.0.0.1",
                    server.audiosocket_port,
                    call.pcm,
                    call_id=call_id,
                    speed=SPEED,
                    dtmf=dtmf.get(call_id),
                )
                for call, call_id in zip(calls, ids, strict=True)
            )
        )
        await collected.wait_ended(ids)

    pairs = []
    for call, call_id, sent in zip(calls, ids, played, strict=True):
        messages = collected.by_call[call_id]
        check_order(messages, call_id)
        assert messages[0]["language"] == "en"  # tiny.en: English from the call's start
        finals = [m for m in messages if m["type"] == "final"]
        for final in finals:
            assert final["language"] == "en"
            words = final["words"]
            assert words, final
            assert all(
                final["start"] - 0.5 <= w["start"] <= w["end"] <= final["end"] + 0.5 for w in words
            )
        hypothesis = " ".join(f["text"] for f in finals)
        pairs.append((call.reference, hypothesis))
        # the pauses between prompts end segments: every final lies within one prompt, and
        # every prompt has one (past SOFT_SEGMENT_SECONDS a prompt may end one at a sentence
        # pause and go on in the next)
        spans = [(u.start - 0.5, u.end + 0.5) for u in call.utterances]
        within = [[a <= f["start"] and f["end"] <= b for a, b in spans] for f in finals]
        assert all(sum(row) == 1 for row in within), (finals, spans)
        assert all(any(column) for column in zip(*within, strict=True)), (finals, spans)

        # DTMF: published as they come, in order, at their place in the audio
        keys = [m for m in messages if m["type"] == "dtmf"]
        assert [k["digit"] for k in keys] == [d for _, d in dtmf.get(call_id, [])]
        for key, (at, _) in zip(keys, dtmf.get(call_id, []), strict=True):
            assert abs(key["at"] - at) < 0.05

        # the recording holds exactly the audio that was sent
        with wave.open(str(recording_path(settings, call_id))) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
            assert w.readframes(w.getnframes()) == call.pcm
        assert sent.bytes_sent == len(call.pcm)

    wer = corpus_wer(pairs)
    print(f"live WER over {len(calls)} concurrent calls: {wer:.3f}")
    assert wer < 0.12, pairs

    # lifecycle channel: each call's start and end
    for call_id in ids:
        kinds = [m["type"] for m in collected.lifecycle if m["call_id"] == call_id]
        assert kinds == ["call_started", "call_ended"]

    conn = await asyncpg.connect(database_url)
    try:
        rows = {
            str(r["call_id"]): r
            for r in await conn.fetch(
                "select c.*, j.id as job_id, j.status as job_status, j.audio_path "
                "from calls c join postcall_jobs j using (call_id) where call_id = any($1::uuid[])",
                ids,
            )
        }
    finally:
        await conn.close()
    assert set(rows) == set(ids)
    for call_id, (_, hypothesis) in zip(ids, pairs, strict=True):
        row = rows[call_id]
        ended = collected.by_call[call_id][-1]
        assert row["status"] == "ended"
        assert row["job_status"] == "queued"
        assert row["job_id"] == ended["job_id"]
        assert row["audio_path"] == str(recording_path(settings, call_id))
        assert row["live_transcript"] == hypothesis
        assert row["dtmf"] == "".join(d for _, d in dtmf.get(call_id, []))
        assert row["sample_rate"] == 8000
        assert row["language"] == "en"


async def test_partials_grow_while_a_segment_is_spoken(settings_env):
    """At real-time pace on an idle server, every segment longer than two seconds shows
    partials before its final, and the last partial is close to the final."""
    settings = make_settings(settings_env)
    call = corpus.build_call(corpus.pick_prompts(3, 31, min_words=10), pause=1.0)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id)
        await collected.wait_ended([call_id])
    messages = collected.by_call[call_id]
    check_order(messages, call_id)
    for final in (m for m in messages if m["type"] == "final"):
        if final["end"] - final["start"] < 2.0:
            continue
        partials = [
            m for m in messages if m["type"] == "partial" and m["segment"] == final["segment"]
        ]
        assert partials, final
        assert [p["end"] for p in partials] == sorted(p["end"] for p in partials)
        assert partials[0]["seq"] < final["seq"]
        assert all(p["start"] == final["start"] for p in partials)
        first_word = final["text"].split()[0].strip(".,").lower()
        assert first_word in partials[-1]["text"].lower()


async def test_silence_and_line_noise_give_no_text(settings_env):
    settings = make_settings(settings_env)
    rng = np.random.default_rng(3)
    seconds = 12
    hum = 300 * np.sin(2 * np.pi * 50 * np.arange(seconds * 8000) / 8000)
    noise = rng.normal(0, 120, seconds * 8000) + hum
    pcm = np.concatenate([np.zeros(4 * 8000), noise]).astype("<i2").tobytes()
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call("127.0.0.1", server.audiosocket_port, pcm, call_id=call_id, speed=4)
        await collected.wait_ended([call_id])
    kinds = [m["type"] for m in collected.by_call[call_id]]
    assert kinds == ["call_started", "call_ended"]
    assert collected.by_call[call_id][-1]["segments"] == 0


def to_ulaw(pcm: bytes) -> bytes:
    return audioop.lin2ulaw(pcm, 2)


@pytest.mark.parametrize("variant", ["slin16-kind", "ulaw-0x10", "slin16-0x10"])
async def test_other_encodings_are_transcribed(settings_env, variant):
    """16 kHz under its own kind (resampled differently), u-law and slin16 carried under 0x10
    when the operator says so."""
    call = corpus.build_call(corpus.pick_prompts(2, 21), pause=0.8)
    pcm8 = call.pcm
    pcm16 = (
        np.clip(
            soxr.resample(np.frombuffer(pcm8, "<i2").astype(np.float32), 8000, 16000), -32768, 32767
        )
        .astype("<i2")
        .tobytes()
    )
    kind, rate, pcm, fmt, recorded_rate = {
        "slin16-kind": (aso.Kind.AUDIO_16K, 16000, pcm16, "slin", 16000),
        "ulaw-0x10": (aso.Kind.AUDIO_8K, 8000, to_ulaw(pcm8), "ulaw", 8000),
        "slin16-0x10": (aso.Kind.AUDIO_8K, 16000, pcm16, "slin16", 16000),
    }[variant]
    frame_rate = 8000 if variant == "ulaw-0x10" else rate  # u-law: one byte per sample
    settings = make_settings(settings_env, AUDIOSOCKET_0X10_FORMAT=fmt)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call(
            "127.0.0.1",
            server.audiosocket_port,
            pcm,
            call_id=call_id,
            kind=kind,
            rate=frame_rate // 2 if variant == "ulaw-0x10" else frame_rate,
            speed=SPEED,
        )
        await collected.wait_ended([call_id])
    messages = collected.by_call[call_id]
    check_order(messages, call_id)
    assert messages[0]["sample_rate"] == recorded_rate
    text = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert corpus_wer([(call.reference, text)]) < 0.2, text
    with wave.open(str(recording_path(settings, call_id))) as w:
        assert w.getframerate() == recorded_rate
        expected = audioop.ulaw2lin(pcm, 2) if variant == "ulaw-0x10" else pcm
        assert w.readframes(w.getnframes()) == expected


async def test_protocol_violation_ends_only_that_call_and_keeps_its_audio(
    settings_env, database_url
):
    settings = make_settings(settings_env)
    call = corpus.build_call(corpus.pick_prompts(2, 5), pause=0.5)
    bad_id, good_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        good = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=good_id, speed=4)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", server.audiosocket_port)
        sent = call.pcm[: 8000 * 2 * 3]
        writer.write(aso.encode(aso.CallId(bad_id)))
        for i in range(0, len(sent), 320):
            writer.write(aso.encode(aso.Audio(aso.Kind.AUDIO_8K, sent[i : i + 320])))
        writer.write(b"\x42\x00\x01x")  # an unknown kind
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server closed it
        writer.close()
        await good
        await collected.wait_ended([bad_id, good_id])
    assert collected.by_call[bad_id][-1]["reason"] == "protocol_error"
    assert collected.by_call[good_id][-1]["reason"] == "hangup"
    with wave.open(str(recording_path(settings, bad_id))) as w:
        assert w.readframes(w.getnframes()) == sent
    conn = await asyncpg.connect(database_url)
    try:
        job = await conn.fetchrow(
            "select * from postcall_jobs where call_id = $1", uuid.UUID(bad_id)
        )
    finally:
        await conn.close()
    assert job is not None and job["status"] == "queued"


@pytest.mark.parametrize("language", ["auto", "sw"])
async def test_multilingual_model_detects_or_follows_the_language(settings_env, language):
    """With a multilingual model (the bundled base), LANGUAGE=auto detects each call's language
    and LANGUAGE=sw decodes in Swahili whatever is spoken."""
    settings = make_settings(settings_env, REALTIME_WHISPER_MODEL="base", LANGUAGE=language)
    call = corpus.build_call(corpus.pick_prompts(2, 23), pause=0.8)
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        await play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id, speed=4)
        await collected.wait_ended([call_id])
    messages = collected.by_call[call_id]
    check_order(messages, call_id)
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == len(call.utterances)
    expected = "en" if language == "auto" else "sw"
    assert {f["language"] for f in finals} == {expected}
    if language == "auto":
        text = " ".join(f["text"] for f in finals)
        assert corpus_wer([(call.reference, text)]) < 0.2, text
