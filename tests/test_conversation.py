"""Two legs of one conversation merged in time order: the merger without I/O, then two real
AudioSocket streams of different prompts under one conversation id."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from streamsrv import corpus, events
from streamsrv.conversation import ConversationHub, ConversationMerger, LegResult, merge_legs
from streamsrv.simulate import play_call
from tests.e2e import Collector, get, make_settings, running_server
from tests.postcall_helpers import drain, fresh_db, insert_job, shared_model, wav_bytes
from tests.test_context import post

__all__ = ["fresh_db"]  # a fixture, used by name


def final(call_id: str, start: float, text: str) -> dict[str, Any]:
    return {"type": "final", "call_id": call_id, "start": start, "text": text}


def test_a_final_waits_until_the_other_leg_has_settled_past_its_start() -> None:
    m = ConversationMerger("L1")
    m.join("caller", started_at=100.0, settled=0.0)
    m.join("agent", started_at=101.0, settled=0.0)
    assert m.final("caller", final("caller", 3.0, "hello")) == []  # at 103; agent only at 101
    assert m.settled("agent", 1.5) == []  # 102.5: the agent may still say something earlier
    assert [x["text"] for x in m.settled("agent", 2.5)] == ["hello"]  # 103.5: it cannot
    # the caller's next sentence (106) was finalised before the agent's (104.5)
    assert m.final("caller", final("caller", 6.0, "are you there")) == []
    assert m.final("agent", final("agent", 3.5, "good morning")) == []  # caller settled at 100
    assert [x["text"] for x in m.settled("caller", 7.0)] == ["good morning"]  # 104.5 < 107
    assert [x["text"] for x in m.leave("agent")] == ["are you there"]


def test_an_alert_goes_to_its_conversation_at_once() -> None:
    out: list[tuple[str, dict[str, Any]]] = []
    hub = ConversationHub(lambda conversation, message: out.append((conversation, message)))
    hub.join("L3", "caller", 0.0, 0.0)
    hub.join("L3", "agent", 0.0, 0.0)
    hub.final("L3", "caller", final("caller", 2.0, "he hits me"))  # waits for the agent
    alert = {"type": "alert", "call_id": "caller", "phrase": "he hits me", "segment": 0}
    hub.alert("L3", alert)
    hub.alert("L4", {**alert, "call_id": "elsewhere"})  # no such conversation here
    assert out == [("L3", alert)]


def test_an_ended_leg_holds_nobody_back_and_the_merger_knows_when_it_is_done() -> None:
    m = ConversationMerger("L2")
    m.join("a", 0.0, 0.0)
    m.join("b", 0.0, 0.0)
    assert m.final("a", final("a", 5.0, "x")) == []
    assert [x["text"] for x in m.leave("b")] == ["x"]
    assert not m.done
    assert m.leave("a") == [] and m.done


@pytest.mark.e2e
async def test_two_legs_of_one_conversation_in_time_order(settings_env, tmp_path):
    rules = tmp_path / "alert-phrases"
    rules.write_text("en [any]: re: \\w\n")  # every final with a word alerts
    settings = make_settings(settings_env, ALERT_PHRASES=str(rules))
    caller = corpus.build_call(corpus.pick_prompts(3, 91), pause=2.5)
    agent = corpus.build_call(corpus.pick_prompts(3, 92), pause=2.5)
    ids = {"caller": str(uuid.uuid4()), "agent": str(uuid.uuid4())}
    conversation = f"linkedid-{uuid.uuid4().hex[:8]}"
    names = events.Channels(settings.redis_channel_prefix)
    async with running_server(settings) as server, Collector(settings) as collected:
        for role, call_id in ids.items():
            data = {"role": role, "conversation": conversation}
            assert (await post(server.http_port, call_id, data=data))[0] == 200
        await asyncio.gather(
            play_call("127.0.0.1", server.audiosocket_port, caller.pcm, call_id=ids["caller"]),
            play_call("127.0.0.1", server.audiosocket_port, agent.pcm, call_id=ids["agent"]),
        )
        await collected.wait_ended(list(ids.values()), within=60)
        await asyncio.sleep(0.5)  # the last release and its publish
        status, body = await get(server.http_port, f"/conversations/{conversation}")
        assert status == 200
        view = json.loads(body)
        missing, _ = await get(server.http_port, "/conversations/nobody")
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            entries = await client.xrange(names.conversation_stream(conversation))
        finally:
            await client.aclose()
    kept = [json.loads(fields[b"data"]) for _, fields in entries]
    merged = [m for m in kept if m["type"] == "final"]
    # every alert of both legs is on the conversation too, as on its call's channel
    alerts = [m for m in kept if m["type"] == "alert"]
    of_legs = [m for call_id in ids.values() for m in collected.by_call[call_id]]
    assert alerts and sorted(alerts, key=lambda m: (m["call_id"], m["seq"])) == sorted(
        (m for m in of_legs if m["type"] == "alert"), key=lambda m: (m["call_id"], m["seq"])
    )
    per_leg = {
        role: [m for m in collected.by_call[call_id] if m["type"] == "final" and m["text"]]
        for role, call_id in ids.items()
    }
    # every final of both legs, once, with its role
    assert sorted(m["seq"] for m in merged if m["role"] == "caller") == sorted(
        m["seq"] for m in per_leg["caller"]
    )
    assert len(merged) == len(per_leg["caller"]) + len(per_leg["agent"])
    assert {m["conversation"] for m in merged} == {conversation}
    # in the order they were spoken across the legs
    started = {
        m["call_id"]: m["started_at"]
        for call_id in ids.values()
        for m in collected.by_call[call_id]
        if m["type"] == "call_started"
    }
    times = [started[m["call_id"]] + m["start"] for m in merged]
    assert times == sorted(times)
    assert {m["role"] for m in merged} == {"caller", "agent"}
    # GET /conversations/<id>: both legs, and the same merged transcript
    assert sorted(leg["role"] for leg in view["legs"]) == ["agent", "caller"]
    assert [t["text"] for t in view["transcript"]] == [m["text"] for m in merged]
    assert [t["role"] for t in view["transcript"]] == [m["role"] for m in merged]
    assert missing == 404


def test_legs_merge_into_turns_by_word_times() -> None:
    def seg(start: float, end: float, *words: tuple[str, float, float]) -> dict[str, Any]:
        text = " ".join(w for w, _, _ in words)
        timed = [{"word": w, "start": s, "end": e} for w, s, e in words]
        return {"start": start, "end": end, "text": text, "words": timed}

    caller = LegResult(
        "c",
        "caller",
        100.0,
        [seg(1.0, 3.0, ("Hello,", 1.0, 1.5), ("is", 2.6, 2.8), ("anyone", 2.8, 3.0))],
    )
    agent = LegResult(
        "a", "agent", 101.0, [seg(0.8, 1.4, ("Yes,", 0.8, 1.1), ("hello.", 1.1, 1.4))]
    )
    no_words = LegResult("s", None, 105.0, [{"start": 0.5, "end": 1.0, "text": "Hm."}])
    transcript, turns = merge_legs([caller, agent, no_words])
    assert transcript == "caller: Hello,\nagent: Yes, hello.\ncaller: is anyone\ns: Hm."
    assert [t["start"] for t in turns] == sorted(t["start"] for t in turns)
    assert turns[1] == {
        "call_id": "a",
        "role": "agent",
        "start": 101.8,
        "end": 102.4,
        "text": "Yes, hello.",
    }


@pytest.mark.e2e
async def test_the_post_call_pass_writes_the_conversation_once_every_leg_is_done(
    settings_env, fresh_db, model_dir, tmp_path
):

    legs = {}
    for role, seed in (("caller", 93), ("agent", 94)):
        call = corpus.build_call(corpus.pick_prompts(2, seed), pause=1.0)
        path = tmp_path / f"{role}.wav"
        path.write_bytes(wav_bytes(call.pcm, corpus.RATE))
        legs[role] = path
    settings = make_settings(settings_env, DATABASE_URL=fresh_db, WORKER_POLL_INTERVAL="0.2")
    model = shared_model(model_dir)
    conn = await asyncpg.connect(fresh_db)
    try:
        await drain(settings, model)  # migrates
        await insert_job(conn, str(legs["caller"]), role="caller", conversation="L7")
        _, second = await insert_job(conn, str(legs["agent"]), role="agent", conversation="L7")
        # the agent's job out of reach: the caller's leg alone is done
        await conn.execute("update postcall_jobs set status = 'failed' where id = $1", second)
        await drain(settings, model)
        assert await conn.fetchval("select count(*) from conversation_results") == 0
        await conn.execute("update postcall_jobs set status = 'queued' where id = $1", second)
        await drain(settings, model)
        row = await conn.fetchrow("select * from conversation_results where conversation = 'L7'")
    finally:
        await conn.close()
    assert row is not None and row["legs"] == 2
    turns = json.loads(row["turns"])
    assert {t["role"] for t in turns} == {"caller", "agent"}
    assert [t["start"] for t in turns] == sorted(t["start"] for t in turns)
    assert row["transcript"].splitlines()[0].startswith(("caller: ", "agent: "))
