"""`streamsrv ari`: the policy without I/O, then a real Asterisk bridging a caller to an agent,
each playing recorded prompts, with a real `streamsrv serve` and `streamsrv ari` beside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from streamsrv import corpus
from streamsrv.ari_client import backoff, basic_auth
from streamsrv.ari_watch import (
    Channel,
    Connected,
    Continue,
    Entered,
    Unwatch,
    Variables,
    Watch,
    WatchConfig,
    Watches,
    leg_context,
    sort_leftovers,
)
from streamsrv.config import ConfigError, Settings
from streamsrv.context import parse_context, whisper_languages
from streamsrv.wer import normalise
from tests.asterisk import Asterisk, missing_reason
from tests.e2e import free_port
from tests.prom import metric
from tests.serverproc import CliProcess, server_process, subprocess_settings


def counter(start: int = 1) -> Callable[[], uuid.UUID]:
    numbers = iter(range(start, start + 1000))
    return lambda: uuid.UUID(int=next(numbers))


def stasis_start(channel_id: str, name: str = "PJSIP/100-1", number: str = "") -> dict[str, Any]:
    return {
        "type": "StasisStart",
        "application": "streamsrv",
        "args": [],
        "channel": {"id": channel_id, "name": name, "caller": {"name": "", "number": number}},
    }


def event(kind: str, channel_id: str) -> dict[str, Any]:
    return {"type": kind, "application": "streamsrv", "channel": {"id": channel_id}}


# -- the policy, without I/O -------------------------------------------------------------------


def test_a_channel_entering_stasis_gets_a_caller_and_an_agent_leg_with_our_own_ids() -> None:
    watches = Watches("streamsrv", new_uuid=counter())
    decision = watches.on_event(stasis_start("1700.1", number="5551234"))
    assert isinstance(decision, Watch)
    assert decision.channel == Channel("1700.1", "PJSIP/100-1", "5551234")
    caller, agent = decision.legs
    assert (caller.spy, caller.role, agent.spy, agent.role) == ("in", "caller", "out", "agent")
    assert caller.call_id != agent.call_id
    assert str(uuid.UUID(caller.call_id)) == caller.call_id  # canonical, as streamsrv wants it
    ids = [caller.bridge_id, caller.snoop_id, caller.media_id, agent.snoop_id, agent.media_id]
    assert len(set(ids)) == 5 and all(watches.is_own(i) for i in ids)
    assert not watches.is_own("1700.1")
    # our own channels entering the app start nothing (they may join their bridge now), nor
    # do leftovers of ours, nor other apps' channels
    assert watches.on_event(stasis_start(caller.snoop_id, "Snoop/1700.1-0")) == Entered(
        caller.snoop_id
    )
    assert watches.on_event(stasis_start(agent.media_id, "AudioSocket/x")) == Entered(
        agent.media_id
    )
    assert watches.on_event(stasis_start("streamsrv-in-old-media", "AudioSocket/y")) is None
    assert watches.on_event({**stasis_start("1800.1"), "application": "other"}) is None
    assert len(watches) == 1


def test_a_watch_ends_once_at_the_first_end_of_the_channel_or_of_one_of_ours() -> None:
    watches = Watches("streamsrv", new_uuid=counter())
    watch = watches.on_event(stasis_start("1700.1"))
    assert isinstance(watch, Watch)
    assert watches.on_event(event("StasisEnd", "1700.1")) is None  # we sent it on ourselves
    assert watches.on_event(event("ChannelVarset", "1700.1")) is None
    ended = watches.on_event(event("ChannelHangupRequest", "1700.1"))
    assert isinstance(ended, Unwatch) and ended.legs == watch.legs
    assert watches.on_event(event("ChannelDestroyed", "1700.1")) is None
    assert watches.on_event(event("StasisEnd", watch.legs[0].snoop_id)) is None
    assert len(watches) == 0
    # a snoop that ends (its channel hung up before we heard of it) ends its watch too
    other = watches.on_event(stasis_start("1700.2"))
    assert isinstance(other, Watch)
    by_snoop = watches.on_event(event("StasisEnd", other.legs[1].media_id))
    assert isinstance(by_snoop, Unwatch) and by_snoop.channel_id == "1700.2"


def test_a_watched_channel_entering_stasis_again_is_only_sent_on() -> None:
    watches = Watches("streamsrv", new_uuid=counter())
    assert isinstance(watches.on_event(stasis_start("1700.1")), Watch)
    assert watches.on_event(stasis_start("1700.1")) == Continue("1700.1")
    assert watches.forget("1700.1", "test") is not None
    assert watches.forget("1700.1", "test") is None


def test_the_agent_is_the_connected_line_of_the_watched_channel() -> None:
    watches = Watches("streamsrv", new_uuid=counter())
    watch = watches.on_event(stasis_start("1700.1"))
    assert isinstance(watch, Watch) and watch.channel.connected_number is None

    def connected(channel_id: str, number: str) -> dict[str, Any]:
        line = {"name": "", "number": number}
        return {
            **event("ChannelConnectedLine", channel_id),
            "channel": {"id": channel_id, "connected": line},
        }

    assert watches.on_event(connected("1700.1", "2001")) == Connected("1700.1", watch.legs, "2001")
    assert watches.on_event(connected("1700.1", "")) is None  # nothing to say
    assert watches.on_event(connected("1700.9", "2001")) is None  # not watched
    # a channel placed to an agent knows it when it enters: both legs' context says so
    placed = stasis_start("1700.2")
    placed["channel"]["connected"] = {"name": "", "number": "2002"}
    second = watches.on_event(placed)
    assert isinstance(second, Watch) and second.channel.connected_number == "2002"
    assert {leg_context(leg, second.channel, Variables(None))["agent"] for leg in second.legs} == {
        "2002"
    }


def test_what_a_killed_run_left_is_adopted_when_whole_and_removed_otherwise() -> None:
    """Three channels watched by a run that was killed: one still up with both legs whole
    (adopted), one still up with a leg whose externalMedia channel is gone, one hung up
    (their snoops ended with it). Besides them: a watch of this run, and others' things."""
    earlier = Watches("streamsrv", new_uuid=counter())
    whole, broken, ended = (earlier.on_event(stasis_start(f"1700.{i}")) for i in (1, 2, 3))
    assert isinstance(whole, Watch) and isinstance(broken, Watch) and isinstance(ended, Watch)
    channels = [{"id": f"1700.{i}", "name": f"PJSIP/10{i}-1"} for i in (1, 2)]
    channels.append({"id": "other-app-1", "name": "PJSIP/200-1"})  # not ours
    bridges = [{"id": "conference", "channels": ["1700.2"]}]  # not ours
    for watch in (whole, broken, ended):
        for leg in watch.legs:
            present = [leg.media_id]
            if watch is not ended:
                name = f"Snoop/{watch.channel.id}-0000000{len(channels)}"
                channels.append({"id": leg.snoop_id, "name": name})
                present.append(leg.snoop_id)
            if watch is broken and leg.spy == "out":
                present.remove(leg.media_id)  # streamsrv closed it
            else:
                channels.append({"id": leg.media_id, "name": "AudioSocket/127.0.0.1:1-1"})
            bridges.append({"id": leg.bridge_id, "channels": present})
    now = Watches("streamsrv", new_uuid=counter(5000))
    mine = now.on_event(stasis_start("1800.1"))
    assert isinstance(mine, Watch)
    for leg in mine.legs:  # being set up by this run: not a leftover
        channels.append({"id": leg.snoop_id, "name": "Snoop/1800.1-00000009"})
        bridges.append({"id": leg.bridge_id, "channels": []})

    left = sort_leftovers("streamsrv", channels, bridges, now.known())
    assert left.adopt == {"1700.1": whole.legs}
    gone = [*broken.legs, *ended.legs]
    assert left.bridges == sorted(leg.bridge_id for leg in gone)
    assert left.channels == sorted(
        i for leg in gone for i in (leg.snoop_id, leg.media_id) if i in {c["id"] for c in channels}
    )
    # adopted, the watch ends as any other: at the end of one of its channels
    assert now.adopt("1700.1", whole.legs) and not now.adopt("1700.1", whole.legs)
    ended_watch = now.on_event(event("StasisEnd", whole.legs[0].snoop_id))
    assert isinstance(ended_watch, Unwatch) and ended_watch.legs == whole.legs


def test_leg_context_is_what_streamsrv_accepts() -> None:
    watches = Watches("streamsrv", new_uuid=counter())
    watch = watches.on_event(stasis_start("1700.1", "PJSIP/100-0000002a", "5551234"))
    assert isinstance(watch, Watch)
    caller, agent = watch.legs
    context = leg_context(caller, watch.channel, Variables("1699.0", "SW ", "helpline"))
    assert context == {
        "role": "caller",
        "language": "sw",
        "conversation": "1699.0",
        "caller": "5551234",
        "queue": "helpline",
        "tags": {"channel": "PJSIP/100-0000002a", "uniqueid": "1700.1", "spy": "in"},
    }
    parsed = parse_context(context, whisper_languages(), english_only=False)
    assert (parsed.role, parsed.conversation, parsed.language) == ("caller", "1699.0", "sw")
    assert parsed.queue == "helpline"
    # no language variable, no caller number: those fields are left out, not sent empty
    bare = leg_context(agent, Channel("1700.1", "Local/s@x-1;2", None), Variables("1699.0"))
    assert "language" not in bare and "caller" not in bare and bare["role"] == "agent"
    assert "agent" not in bare and "queue" not in bare
    assert parse_context(bare, whisper_languages(), english_only=True).role == "agent"


def test_addresses_default_to_the_servers_own_listeners() -> None:
    config = WatchConfig.from_settings(
        Settings(audiosocket_host="0.0.0.0", audiosocket_port=9100, http_port=8200)
    )
    assert config.audiosocket_address == "127.0.0.1:9100"
    assert config.streamsrv_url == "http://127.0.0.1:8200"
    explicit = WatchConfig.from_settings(
        Settings(
            ari_audiosocket_address="10.0.0.5:9092",
            ari_streamsrv_url="http://10.0.0.5:8125/",
            http_token="t",
        )
    )
    assert explicit.audiosocket_address == "10.0.0.5:9092"
    assert explicit.streamsrv_url == "http://10.0.0.5:8125"
    assert explicit.token == "t"
    assert "secret" not in repr(Settings(ari_password="secret"))


def test_bad_ari_settings_are_named() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping(
            {
                "ARI_URL": "127.0.0.1:8088",
                "ARI_APP": "bad app",
                "ARI_AUDIOSOCKET_ADDRESS": "nohost",
                "ARI_LANGUAGE_VARIABLE": "1x",
            }
        )
    named = {p.split(":")[0] for p in caught.value.problems}
    assert named == {"ARI_URL", "ARI_APP", "ARI_AUDIOSOCKET_ADDRESS", "ARI_LANGUAGE_VARIABLE"}


def test_basic_auth_header() -> None:
    assert basic_auth("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


def test_reconnects_back_off_briefly_and_are_capped() -> None:
    delays = [backoff(n) for n in range(1, 10)]
    assert delays[0] == 0.25 and delays == sorted(delays) and max(delays) == 5.0


# -- a real Asterisk ---------------------------------------------------------------------------

ARI_USER, ARI_PASSWORD = "streamsrv", "test-secret"


def dialplan(caller: list[str], agent: list[str], agent_waits: float) -> str:
    """The watched channel is the `;2` half of Local/s@caller: what its `;1` half ([phone])
    plays is what it sends (spy in); what the agent it dials plays is what it hears (spy out).
    The agent speaks once the caller has finished, then hangs up; the caller's dialplan goes
    on after Dial (option g) and logs how it ended."""

    def plays(names: list[str]) -> str:
        return "".join(
            f" same => n,Playback({corpus.sounds_dir() / name})\n same => n,Wait(1)\n"
            for name in names
        )

    ends = "linkedid=${CHANNEL(linkedid)} dial=${AFTER_DIAL} playback=${PLAYBACKSTATUS}"
    return (
        "[phone]\nexten => s,1,Answer()\n same => n,Wait(2)\n"
        + plays(caller)
        + " same => n,Wait(120)\n"
        + "[caller]\nexten => s,1,Answer()\n same => n,Set(CALLERID(num)=5551234)\n"
        + " same => n,Set(STREAMSRV_LANGUAGE=en)\n"
        + " same => n,Set(STREAMSRV_QUEUE=helpline)\n same => n,Stasis(streamsrv)\n"
        + " same => n,Dial(Local/s@agent/n,,g)\n same => n,Set(AFTER_DIAL=${DIALSTATUS})\n"
        + f" same => n,Playback({corpus.sounds_dir() / 'beep'})\n"
        + f" same => n,Log(NOTICE,streamsrv-test end {ends})\n same => n,Hangup()\n"
        + "exten => h,1,Log(NOTICE,streamsrv-test hangup cause=${HANGUPCAUSE})\n"
        + "[agent]\nexten => s,1,Set(CONNECTEDLINE(num)=2001)\n same => n,Answer()\n"
        + f" same => n,Wait({agent_waits:.1f})\n"
        + plays(agent)
        + " same => n,Hangup()\n"
    )


def asterisk_configs(ari_port: int, extensions: str) -> dict[str, str]:
    return {
        "http.conf": f"[general]\nenabled=yes\nbindaddr=127.0.0.1\nbindport={ari_port}\n",
        "ari.conf": f"[general]\nenabled=yes\n[{ARI_USER}]\ntype=user\npassword={ARI_PASSWORD}\n",
        "extensions.conf": extensions,
    }


def seconds(names: list[str]) -> float:
    return sum(len(corpus.read_prompt(n)) / 2 / corpus.RATE + 1 for n in names)


class AriProcess(CliProcess):
    """`python -m streamsrv.cli ari`, with JSON logs read from its stderr."""

    COMMAND = "ari"

    async def start(self) -> None:
        await self.spawn()

    async def wait_event(self, name: str, count: int = 1, within: float = 30.0) -> dict[str, Any]:
        """The `count`th log line of this event, once written."""
        await until(lambda: len(self.events(name)) >= count, within, f"{name} x{count}", self)
        return self.events(name)[count - 1]

    async def stop(self, within: float = 20.0) -> int:
        return await super().stop(within)


@contextlib.asynccontextmanager
async def successor_of(ari: AriProcess) -> AsyncIterator[AriProcess]:
    """The next `streamsrv ari` run after `ari` was killed, with its environment; it must
    exit cleanly when stopped."""
    successor = AriProcess(ari.env)
    await successor.start()
    try:
        yield successor
    finally:
        assert await successor.stop() == 0


def ari_env(base: dict[str, str], ari_port: int, audiosocket: int, http: int) -> dict[str, str]:
    """`streamsrv ari`'s environment: `base`, the private Asterisk's ARI, where it sends the
    legs (AudioSocket) and their context (HTTP), and a metrics port of its own."""
    return {
        **base,
        "ARI_URL": f"http://127.0.0.1:{ari_port}",
        "ARI_USER": ARI_USER,
        "ARI_PASSWORD": ARI_PASSWORD,
        "ARI_AUDIOSOCKET_ADDRESS": f"127.0.0.1:{audiosocket}",
        "ARI_STREAMSRV_URL": f"http://127.0.0.1:{http}",
        "ARI_METRICS_PORT": str(free_port()),
    }


async def scrape(ari: AriProcess) -> str:
    """GET /metrics of a running `streamsrv ari`."""
    url = f"http://127.0.0.1:{ari.env['ARI_METRICS_PORT']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def until(
    condition: Callable[[], bool], within: float, what: str, ari: AriProcess | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            logs = (ari.logs[-10:], ari.other_lines[-20:]) if ari else ""
            raise AssertionError(f"no {what} within {within} s {logs}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def bridged_setup(
    settings_env: dict[str, str], extensions: str
) -> AsyncIterator[tuple[Any, Asterisk, AriProcess, Any]]:
    """A real streamsrv serve, a private Asterisk with ARI, and `streamsrv ari` between them."""
    _, env = subprocess_settings(settings_env)
    ari_port = free_port()
    asterisk = Asterisk(asterisk_configs(ari_port, extensions))
    async with server_process(env) as server:
        await asterisk.start()
        ari = AriProcess(ari_env(env, ari_port, server.audiosocket_port, server.http_port))
        try:
            await ari.start()
            await ari.wait_event("ari_connected")
            rest = aiohttp.ClientSession(
                base_url=f"http://127.0.0.1:{ari_port}",
                headers={"Authorization": basic_auth(ARI_USER, ARI_PASSWORD)},
            )
            async with rest:
                yield server, asterisk, ari, rest
        finally:
            if ari.proc is not None:
                await ari.stop()
            await asterisk.stop()
            asterisk.remove()


async def ari_get(rest: aiohttp.ClientSession, path: str) -> Any:
    async with rest.get(f"/ari{path}") as response:
        assert response.status == 200, path
        return await response.json()


async def ended_legs(server: Any, conversation: str, count: int) -> list[dict[str, Any]]:
    """The conversation's legs (calls rows), once `count` of them have ended."""
    legs: list[dict[str, Any]] = []

    async def poll() -> None:
        while True:
            status, body = await server.get(f"/conversations/{conversation}")
            if status == 200:
                legs[:] = json.loads(body)["legs"]
                if len(legs) >= count and all(leg["status"] == "ended" for leg in legs):
                    return
            await asyncio.sleep(0.5)

    await asyncio.wait_for(poll(), 120)
    return legs


def overlap(reference: str, text: str) -> float:
    """The share of the reference's distinct words that the text has."""
    ref, got = set(normalise(reference)), set(normalise(text))
    return len(ref & got) / max(1, len(ref))


skip_without_asterisk = pytest.mark.skipif(
    missing_reason() is not None, reason=missing_reason() or ""
)


@pytest.mark.e2e
@skip_without_asterisk
async def test_both_directions_of_a_bridged_call_with_roles_and_the_call_undisturbed(
    settings_env: dict[str, str],
) -> None:
    caller_prompts = corpus.pick_prompts(2, 41)
    agent_prompts = [p for p in corpus.pick_prompts(4, 42) if p not in caller_prompts][:2]
    texts = corpus.texts()
    caller_ref = " ".join(texts[p] for p in caller_prompts)
    agent_ref = " ".join(texts[p] for p in agent_prompts)
    extensions = dialplan(caller_prompts, agent_prompts, seconds(caller_prompts) + 3)
    async with bridged_setup(settings_env, extensions) as (server, asterisk, ari, rest):
        await asterisk.rx("channel originate Local/s@caller extension s@phone")
        watching = await ari.wait_event("ari_watching")
        during = await scrape(ari)
        unwatched = await ari.wait_event("ari_unwatched", within=120)
        after = await scrape(ari)
        linkedid = watching["conversation"]
        legs = await ended_legs(server, linkedid, 2)
        status, body = await server.get(f"/conversations/{linkedid}")
        bridges = await ari_get(rest, "/bridges")
        channels = await ari_get(rest, "/channels")
        shown = await asterisk.rx("core show channels")
        log = asterisk.log
    assert status == 200
    # the watched channel, both legs, their context in the calls rows
    assert watching["channel"].startswith("Local/s@caller-") and watching["language"] == "en"
    assert unwatched["channel_id"] == watching["channel_id"] and not unwatched["errors"]
    by_role = {leg["role"]: leg for leg in legs}
    assert sorted(by_role) == ["agent", "caller"]
    assert {r: by_role[r]["call_id"] for r in by_role} == watching["legs"]
    for leg in legs:
        assert leg["conversation"] == linkedid and leg["caller"] == "5551234"
        assert leg["agent"] == "2001"  # the connected line, once the agent answered
        assert leg["queue"] == "helpline"  # ARI_QUEUE_VARIABLE
        assert leg["language"] == "en"
        assert leg["tags"]["uniqueid"] == watching["channel_id"]
        assert leg["tags"]["channel"] == watching["channel"]
    # each direction transcribed on its own leg: the caller's prompts as caller, the agent's
    # as agent, and little of the other side in either
    caller_text, agent_text = (
        by_role["caller"]["live_transcript"],
        by_role["agent"]["live_transcript"],
    )
    assert overlap(caller_ref, caller_text) >= 0.5, (caller_ref, caller_text)
    assert overlap(agent_ref, agent_text) >= 0.5, (agent_ref, agent_text)
    only_agent = " ".join(set(normalise(agent_ref)) - set(normalise(caller_ref)))
    only_caller = " ".join(set(normalise(caller_ref)) - set(normalise(agent_ref)))
    assert overlap(only_agent, caller_text) <= 0.25, caller_text
    assert overlap(only_caller, agent_text) <= 0.25, agent_text
    merged = json.loads(body)["transcript"]
    assert {t["role"] for t in merged} == {"caller", "agent"}
    # nothing of ours is left in Asterisk, and the call ran its dialplan to its end
    assert bridges == [] and channels == [], (bridges, channels)
    assert "0 active channels" in shown
    assert f"streamsrv-test end linkedid={linkedid} dial=ANSWER playback=SUCCESS" in log, log[
        -3000:
    ]
    assert "streamsrv-test hangup cause=16" in log
    assert ari.proc is not None and ari.proc.returncode == 0
    assert ari.events("ari_stopped") and not ari.events("ari_watch_failed")
    # what an operator's Prometheus sees of it
    assert metric(during, "streamsrv_ari_connected") == 1
    assert metric(during, "streamsrv_ari_watched_channels") == 1
    assert metric(after, "streamsrv_ari_watched_channels") == 0
    assert metric(after, "streamsrv_ari_watches_total", outcome="watching") == 1
    assert 'streamsrv_ari_watches_total{outcome="failed"}' in after  # exported at zero
    assert metric(after, "streamsrv_ari_watches_total", outcome="failed") == 0
    assert metric(after, "streamsrv_ari_setup_seconds_count") == 1
    assert metric(after, "streamsrv_ari_setup_seconds_sum") == pytest.approx(
        watching["setup_ms"] / 1000, abs=0.002
    )
    assert metric(after, "streamsrv_ari_context_failures_total") == 0


@pytest.mark.e2e
@skip_without_asterisk
async def test_a_run_killed_mid_call_is_followed_by_one_that_adopts_its_legs(
    settings_env: dict[str, str],
) -> None:
    """`streamsrv ari` is killed (SIGKILL: no cleanup) right after it set up a call's legs; the
    next run takes them over: the agent, who speaks only after that, is still transcribed on
    the same leg, and at the hangup nothing of ours is left in Asterisk."""
    caller_prompts = corpus.pick_prompts(1, 46)
    agent_prompts = [p for p in corpus.pick_prompts(3, 47) if p not in caller_prompts][:2]
    agent_ref = " ".join(corpus.texts()[p] for p in agent_prompts)
    extensions = dialplan(caller_prompts, agent_prompts, seconds(caller_prompts) + 4)
    async with bridged_setup(settings_env, extensions) as (server, asterisk, ari, rest):
        await asterisk.rx("channel originate Local/s@caller extension s@phone")
        watching = await ari.wait_event("ari_watching")
        await ari.kill()
        left = await ari_get(rest, "/bridges")
        async with successor_of(ari) as successor:
            adopted = await successor.wait_event("ari_adopted")
            metrics = await scrape(successor)
            unwatched = await successor.wait_event("ari_unwatched", within=120)
            legs = await ended_legs(server, watching["conversation"], 2)
            bridges = await ari_get(rest, "/bridges")
            channels = await ari_get(rest, "/channels")
        log = asterisk.log
    assert len([b for b in left if b["id"].startswith("streamsrv-")]) == 2  # both legs' bridges
    assert adopted["channel_id"] == watching["channel_id"]
    assert adopted["legs"] == watching["legs"]
    assert unwatched["channel_id"] == watching["channel_id"] and not unwatched["errors"]
    assert not successor.events("ari_watching")  # no second pair of legs
    assert not successor.events("ari_leftovers_removed")
    assert metric(metrics, "streamsrv_ari_adopted_total") == 1
    assert metric(metrics, "streamsrv_ari_watched_channels") == 1
    by_role = {leg["role"]: leg for leg in legs}
    assert {r: by_role[r]["call_id"] for r in by_role} == watching["legs"]
    agent_text = by_role["agent"]["live_transcript"]
    assert overlap(agent_ref, agent_text) >= 0.5, (agent_ref, agent_text)
    assert bridges == [] and channels == [], (bridges, channels)
    assert f"end linkedid={watching['conversation']} dial=ANSWER playback=SUCCESS" in log


@pytest.mark.e2e
@skip_without_asterisk
async def test_what_a_killed_run_left_after_its_call_ended_is_removed(
    settings_env: dict[str, str],
) -> None:
    caller_prompts = corpus.pick_prompts(1, 48)
    extensions = dialplan(caller_prompts, caller_prompts, 1.0)
    async with bridged_setup(settings_env, extensions) as (_, asterisk, ari, rest):
        await asterisk.rx("channel originate Local/s@caller extension s@phone")
        watching = await ari.wait_event("ari_watching")
        await ari.kill()
        await until(lambda: "streamsrv-test hangup" in asterisk.log, 60, "the call's end")
        left = await ari_get(rest, "/bridges")
        async with successor_of(ari) as successor:
            removed = await successor.wait_event("ari_leftovers_removed")
            metrics = await scrape(successor)
            bridges = await ari_get(rest, "/bridges")
            channels = await ari_get(rest, "/channels")
    legs = watching["legs"].values()
    assert sorted(b["id"] for b in left) == sorted(removed["bridges"])
    assert all(any(call_id in b for b in removed["bridges"]) for call_id in legs)
    assert not successor.events("ari_adopted") and not removed["errors"]
    assert metric(metrics, "streamsrv_ari_leftovers_removed_total") == len(
        removed["channels"] + removed["bridges"]
    )
    assert bridges == [] and channels == [], (bridges, channels)


@pytest.mark.e2e
@skip_without_asterisk
async def test_after_asterisk_restarts_the_next_call_is_watched(
    settings_env: dict[str, str],
) -> None:
    caller_prompts = corpus.pick_prompts(1, 43)
    agent_prompts = [p for p in corpus.pick_prompts(2, 44) if p not in caller_prompts][:1]
    extensions = dialplan(caller_prompts, agent_prompts, seconds(caller_prompts) + 2)
    async with bridged_setup(settings_env, extensions) as (server, asterisk, ari, rest):
        await asterisk.stop()
        await ari.wait_event("ari_disconnected")
        await ari.wait_event("ari_unreachable")  # it keeps trying while Asterisk is away
        await asterisk.start()
        await ari.wait_event("ari_connected", count=2)
        await asterisk.rx("channel originate Local/s@caller extension s@phone")
        watching = await ari.wait_event("ari_watching")
        await ari.wait_event("ari_unwatched", within=120)
        legs = await ended_legs(server, watching["conversation"], 2)
        bridges = await ari_get(rest, "/bridges")
        log = asterisk.log
    assert sorted(leg["role"] for leg in legs) == ["agent", "caller"]
    assert {leg["call_id"] for leg in legs} == set(watching["legs"].values())
    assert bridges == []
    assert f"end linkedid={watching['conversation']} dial=ANSWER playback=SUCCESS" in log


@pytest.mark.e2e
@skip_without_asterisk
async def test_a_leg_that_cannot_be_set_up_leaves_the_call_alone() -> None:
    """Nothing listens where the legs should go (neither AudioSocket nor HTTP): the failure is
    logged, what was made is torn down, and the call runs its dialplan to its end."""
    caller_prompts = corpus.pick_prompts(1, 45)
    extensions = dialplan(caller_prompts, caller_prompts, 1.0)
    ari_port, closed = free_port(), free_port()
    asterisk = Asterisk(asterisk_configs(ari_port, extensions))
    ari = AriProcess(ari_env({**os.environ, "LOG_FORMAT": "json"}, ari_port, closed, closed))
    try:
        await asterisk.start()
        await ari.start()
        await ari.wait_event("ari_connected")
        await asterisk.rx("channel originate Local/s@caller extension s@phone")
        failed = await ari.wait_event("ari_watch_failed")
        unwatched = await ari.wait_event("ari_unwatched")
        metrics = await scrape(ari)
        await until(lambda: "streamsrv-test hangup" in asterisk.log, 60, "the call's end")
        async with aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{ari_port}",
            headers={"Authorization": basic_auth(ARI_USER, ARI_PASSWORD)},
        ) as rest:
            bridges, channels = await ari_get(rest, "/bridges"), await ari_get(rest, "/channels")
        log = asterisk.log
    finally:
        if ari.proc is not None:
            await ari.stop()
        await asterisk.stop()
        asterisk.remove()
    assert failed["channel"].startswith("Local/s@caller-") and unwatched["why"] == "setup failed"
    assert ari.events("ari_context_failed")  # logged, and the leg was tried without it
    assert metric(metrics, "streamsrv_ari_watches_total", outcome="failed") == 1
    assert 'streamsrv_ari_watches_total{outcome="watching"}' in metrics  # exported at zero
    assert metric(metrics, "streamsrv_ari_watches_total", outcome="watching") == 0
    assert metric(metrics, "streamsrv_ari_context_failures_total") >= 1
    assert metric(metrics, "streamsrv_ari_watched_channels") == 0
    assert bridges == [] and channels == []
    assert "dial=ANSWER playback=SUCCESS" in log and "streamsrv-test hangup cause=16" in log
