"""Concurrent calls in English and Spanish on the bundled multilingual base model, with each
call's language set by its context (every final in it) and with LANGUAGE=auto (decided once per
call, every final from then on in it), and close to what the prompts say."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from streamsrv import corpus
from streamsrv.simulate import play_call
from streamsrv.wer import wer
from tests.e2e import Collector, make_settings, running_server
from tests.test_context import post

pytestmark = pytest.mark.e2e


def calls_in(language: str, seeds: tuple[int, ...]) -> list[corpus.RecordedCall]:
    """Calls of prompts that exist in both languages, in `language`."""
    spanish, english = corpus.texts("es"), corpus.texts("en")
    both = sorted(n for n in spanish if n in english and 6 <= len(english[n].split()) <= 16)
    picked = [[both[(seed * 7 + k * 11) % len(both)] for k in range(3)] for seed in seeds]
    return [corpus.build_call(names, pause=1.0, language=language) for names in picked]


@pytest.mark.parametrize("how", ["context", "auto"])
async def test_english_and_spanish_calls_at_once(settings_env, how):
    settings = make_settings(settings_env, REALTIME_WHISPER_MODEL="base", LANGUAGE="auto")
    calls = [("en", c) for c in calls_in("en", (1, 2))] + [
        ("es", c) for c in calls_in("es", (3, 4))
    ]
    ids = [str(uuid.uuid4()) for _ in calls]
    async with running_server(settings) as server, Collector(settings) as collected:
        if how == "context":
            for call_id, (language, _) in zip(ids, calls, strict=True):
                status, _ = await post(server.http_port, call_id, data={"language": language})
                assert status == 200
        await asyncio.gather(
            *(
                play_call("127.0.0.1", server.audiosocket_port, call.pcm, call_id=call_id)
                for call_id, (_, call) in zip(ids, calls, strict=True)
            )
        )
        await collected.wait_ended(ids, within=120)
    for call_id, (language, call) in zip(ids, calls, strict=True):
        messages = collected.by_call[call_id]
        finals = [m for m in messages if m["type"] == "final" and m["text"]]
        decided = [m for m in messages if m["type"] == "language_detected"]
        text = " ".join(m["text"] for m in finals)
        error = wer(call.reference, text)
        print(f"{how} {language}: WER {error:.2f} {[d['probability'] for d in decided]} {text!r}")
        if how == "auto":
            assert "language" not in messages[0]  # not known when the call starts
            assert [d["language"] for d in decided] == [language]  # decided once
            # every final is in it, the first too: it waits for the decision
            assert finals and {m["language"] for m in finals} == {language}
            first_final = next(m for m in messages if m["type"] == "final")
            assert messages.index(decided[0]) < messages.index(first_final)
        else:
            assert messages[0]["language"] == language  # known from the call's start
            assert decided == []  # the context said it: nothing to detect
            assert finals and {m["language"] for m in finals} == {language}
        assert error <= (0.25 if language == "en" else 0.45)
