"""Call context from the PBX: parsing (form-encoded as Asterisk's CURL() sends it, and JSON),
the bounded store of contexts that come before their call, and a real server: context before
and during a call, in its messages, its row and its job; bad input; who may write."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from streamsrv import corpus
from streamsrv.context import (
    CallContext,
    ContextError,
    PendingContexts,
    parse_context,
    whisper_languages,
)
from streamsrv.simulate import play_call
from tests.e2e import Collector, get, make_settings, running_server

LANGUAGES = whisper_languages()


def parsed(values: dict[str, Any], english_only: bool = False) -> CallContext:
    return parse_context(values, LANGUAGES, english_only)


def test_the_fields_asterisk_sends() -> None:
    context = parsed(
        {
            "language": "SW",
            "role": "Caller",
            "conversation": "1764720000.42",
            "caller": "+254700000000",
            "agent": "",  # ${CALLERID(...)} empty: not given
            "tags.campaign": "night",
        }
    )
    assert context.as_json() == {
        "language": "sw",
        "role": "caller",
        "conversation": "1764720000.42",
        "caller": "+254700000000",
        "tags": {"campaign": "night"},
    }
    assert context.fixed_language == "sw" and parsed({"language": "auto"}).fixed_language is None


@pytest.mark.parametrize(
    ("values", "english_only", "status", "words"),
    [
        ({"langauge": "en"}, False, 422, "unknown"),
        ({"language": "xx"}, False, 422, "not a Whisper language"),
        ({"language": "sw"}, True, 422, "English only"),
        ({"role": "two words"}, False, 422, "short word"),
        ({"caller": "x" * 200}, False, 422, "longer than"),
        ({"queue": "a\x00b"}, False, 422, "control"),
        ({"tags": ["a"]}, False, 422, "object"),
        ({f"tags.t{n}": "v" for n in range(17)}, False, 422, "at most 16"),
        ({"tags": {"bad key!": "v"}}, False, 422, "tag name"),
        ({"role": 5}, False, 422, "string"),
    ],
)
def test_bad_fields_are_refused_with_a_reason(values, english_only, status, words) -> None:
    with pytest.raises(ContextError) as caught:
        parsed(values, english_only)
    assert caught.value.status == status and words in caught.value.message


def test_a_later_post_adds_to_what_came_before() -> None:
    first = parsed({"role": "caller", "tags": {"a": "1"}, "queue": "sales"})
    later = parsed({"role": "agent", "tags": {"b": "2"}})
    assert first.merged(later).as_json() == {
        "role": "agent",
        "queue": "sales",
        "tags": {"a": "1", "b": "2"},
    }


def test_contexts_waiting_for_their_call_are_bounded_in_count_and_time() -> None:
    held = PendingContexts(limit=3, ttl=10.0)
    for n in range(5):
        held.put(f"c{n}", CallContext(role="caller"), now=float(n))
    assert len(held) == 3 and held.take("c0", now=5.0) is None  # the oldest made room
    assert held.take("c4", now=5.0) == CallContext(role="caller")
    assert held.take("c2", now=12.5) is None  # expired
    held.put("c9", CallContext(role="caller"), now=20.0)
    held.put("c9", CallContext(queue="q"), now=21.0)
    assert held.take("c9", now=22.0) == CallContext(role="caller", queue="q")


# -- against a real server -------------------------------------------------------------------


async def post(port: int, call_id: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/calls/{call_id}/context"
    async with aiohttp.ClientSession() as session, session.post(url, **kwargs) as response:
        return response.status, await response.json()


async def row(database_url: str, call_id: str) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(
            "select c.role, c.conversation, c.caller, c.queue, c.tags, c.language,"
            " j.language as job_language from calls c join postcall_jobs j using (call_id)"
            " where call_id = $1",
            uuid.UUID(call_id),
        )
    finally:
        await conn.close()


@pytest.mark.e2e
async def test_context_before_and_during_calls_reaches_messages_rows_and_jobs(settings_env):
    settings = make_settings(settings_env)
    calls = [corpus.build_call(corpus.pick_prompts(3, seed), pause=0.8) for seed in (81, 82)]
    before, during = str(uuid.uuid4()), str(uuid.uuid4())
    async with running_server(settings) as server, Collector(settings) as collected:
        port = server.http_port
        # as Asterisk's CURL() sends it, before the call connects
        form = {"language": "en", "role": "caller", "conversation": "L1", "caller": "+2547"}
        status, body = await post(port, before, data={**form, "tags.line": "7"})
        assert (status, body["state"]) == (200, "held")
        first = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, calls[0].pcm, call_id=before, speed=2)
        )
        second = asyncio.create_task(
            play_call("127.0.0.1", server.audiosocket_port, calls[1].pcm, call_id=during, speed=2)
        )
        await collected.wait_message(during, "final", within=30)
        status, body = await post(port, during, json={"role": "agent", "conversation": "L1"})
        assert (status, body["state"]) == (200, "applied")
        await asyncio.gather(first, second)
        await collected.wait_ended([before, during], within=60)
        status, _ = await post(port, before, json={"role": "agent"})
        assert status == 409  # the call has ended
        shown = json.loads((await get(port, f"/calls/{before}"))[1])
    messages = collected.by_call[before]
    started = messages[0]
    assert started["type"] == "call_started"
    assert started["context"] == {**form, "tags": {"line": "7"}}
    finals = [m for m in messages if m["type"] == "final"]
    assert finals and all((m["role"], m["conversation"]) == ("caller", "L1") for m in finals)
    assert all(m["language"] == "en" for m in finals)
    # the other call: finals before the context have no role, those after it do
    later = collected.by_call[during]
    kinds = [m["type"] for m in later]
    at = kinds.index("call_context")
    assert later[at]["context"] == {"role": "agent", "conversation": "L1"}
    roles = [m["role"] for m in later if m["type"] == "final"]
    before_context = [m["role"] for m in later[:at] if m["type"] == "final"]
    assert before_context and set(before_context) == {None}
    assert roles[len(before_context) :] and set(roles[len(before_context) :]) == {"agent"}
    stored = await row(settings.database_url, before)
    assert (stored["role"], stored["conversation"], stored["caller"]) == ("caller", "L1", "+2547")
    assert stored["language"] == "en" and stored["job_language"] == "en"
    assert (shown["role"], shown["conversation"]) == ("caller", "L1")
    assert (await row(settings.database_url, during))["role"] == "agent"


@pytest.mark.e2e
async def test_bad_context_is_refused_and_stores_nothing(settings_env):
    settings = make_settings(settings_env, DEFAULT_PROCESSING_MODE="hybrid")
    call_id = str(uuid.uuid4())
    async with running_server(settings) as server:
        port = server.http_port
        cases = [
            ({"data": {"language": "sw"}}, 422),  # tiny.en knows only English
            ({"data": {"rol": "caller"}}, 422),
            ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
            ({"json": ["role", "caller"]}, 400),
            ({"data": "x=" + "y" * 9000}, 413),
            ({"data": b"a", "headers": {"Content-Type": "text/plain"}}, 400),
        ]
        for kwargs, expected in cases:
            status, body = await post(port, call_id, **kwargs)
            assert status == expected and body["error"], (kwargs, body)
        status, _ = await post(port, "not-a-uuid", data={"role": "caller"})
        assert status == 400
        assert len(server.contexts.held) == 0


@pytest.mark.e2e
@pytest.mark.parametrize(("token", "header", "expected"), [
    ("", None, 403),  # not on loopback, nothing set: writes refused
    ("s3cret", None, 401),
    ("s3cret", "Bearer wrong", 401),
    ("s3cret", "Bearer s3cret", 200),
])  # fmt: skip
async def test_writes_off_loopback_need_a_token(settings_env, token, header, expected):
    settings = make_settings(settings_env, HTTP_HOST="0.0.0.0", HTTP_TOKEN=token)
    headers = {"Authorization": header} if header else {}
    async with running_server(settings) as server:
        status, body = await post(
            server.http_port, str(uuid.uuid4()), data={"role": "caller"}, headers=headers
        )
    assert status == expected
    assert token not in str(body) or not token
