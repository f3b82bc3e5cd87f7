"""The live board in a real headless browser (Debian's chromium, driven by chromedriver through
selenium) against a real `streamsrv serve` with the model, while two legs of one conversation
play real prompts: their words appear, finals replace partials, and a page whose connection is
cut for a few seconds ends with every final exactly once.

The browser reaches the server through a TCP relay that the test can cut, as a network would.
BOARD_SCREENSHOT=<path> saves what the page looked like during the call (docs/board.png)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamsrv import corpus, events
from streamsrv.simulate import play_call
from tests.e2e import make_settings
from tests.postcall_helpers import drain, fresh_db, shared_model
from tests.serverproc import ServerProcess
from tests.test_context import post

__all__ = ["fresh_db"]  # a fixture, used by name

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (make test installs them)",
    ),
]


class Relay:
    """A TCP relay to the server's HTTP port that can drop every connection and refuse new
    ones for a while, as a network outage would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.down = False
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    async def cut(self, seconds: float) -> None:
        self.down = True
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(seconds)
        self.down = False

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()


def open_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,700")
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


# Every transcript line the page ever drew, in order: (kind, call, segment, text).
WATCH_LINES = """
window.__lines = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) {
    if (!(n instanceof Element)) continue;
    for (const l of n.matches('.line') ? [n] : n.querySelectorAll('.line'))
      window.__lines.push([l.dataset.kind, l.dataset.call, l.dataset.segment,
                           l.querySelector('.text').textContent]);
  }
}).observe(document.getElementById('detail'), {childList: true, subtree: true});
"""


async def until(check: Callable[[], Any], within: float, what: str) -> Any:
    """Poll a browser-side check (run in a thread: selenium blocks) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the page never showed {what} within {within} s")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def server_process(env: dict[str, str]) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(env)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def kept_finals(redis_url: str, prefix: str, call_ids: list[str]) -> list[tuple[str, str]]:
    """(call, segment) -> text of every final with words, from the calls' streams."""
    client = aioredis.Redis.from_url(redis_url)
    names = events.Channels(prefix)
    found = []
    try:
        for call_id in call_ids:
            for _, fields in await client.xrange(names.stream(call_id)):
                message = json.loads(fields[b"data"])
                if message["type"] == "final" and message["text"]:
                    found.append((f"{call_id}/{message['segment']}", message["text"]))
    finally:
        await client.aclose()
    return sorted(found)


async def test_the_board_follows_two_legs_live_and_a_cut_page_misses_nothing(
    settings_env, tmp_path, fresh_db, model_dir
):
    prefix = f"t{secrets.token_hex(4)}:"
    settings_env = {**settings_env, "DATABASE_URL": fresh_db}  # a queue of its own
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("en [conference]: unlock the conference\n")
    env = {
        **os.environ, **settings_env, "REDIS_CHANNEL_PREFIX": prefix,
        "ALERT_PHRASES": str(phrases),
    }  # fmt: skip
    caller = corpus.build_call(corpus.pick_prompts(4, 51), pause=1.5)
    agent = corpus.build_call(corpus.pick_prompts(4, 52), pause=1.5)
    ids = {"caller": str(uuid.uuid4()), "agent": str(uuid.uuid4())}
    conversation = f"board-{uuid.uuid4().hex[:8]}"
    async with server_process(env) as server, Relay(server.http_port) as relay:
        browser = await asyncio.to_thread(open_browser)
        try:
            await asyncio.to_thread(browser.get, f"http://127.0.0.1:{relay.port}/")
            await asyncio.to_thread(browser.execute_script, WATCH_LINES)
            for role, call_id in ids.items():
                context = {"role": role, "conversation": conversation, "caller": "+254700000001"}
                assert (await post(server.http_port, call_id, data=context))[0] == 200
            port = server.audiosocket_port
            calls = [
                asyncio.create_task(play_call("127.0.0.1", port, c.pcm, call_id=i))
                for c, i in ((caller, ids["caller"]), (agent, ids["agent"]))
            ]

            def row() -> Any:
                found = browser.find_elements("css selector", "#active li")
                return found[0] if found else None

            entry = await until(row, 30, "the conversation among the active calls")
            badges = await asyncio.to_thread(lambda: entry.text)
            await asyncio.to_thread(entry.click)

            def finals_shown() -> list[Any]:
                return browser.find_elements("css selector", "#detail .line[data-kind=final]")

            await until(finals_shown, 60, "a final of the opened conversation")
            cut = asyncio.create_task(relay.cut(4.0))  # both legs go on talking meanwhile
            await asyncio.sleep(2.5)
            state = await asyncio.to_thread(lambda: browser.find_element("id", "link").text)
            await cut
            if path := os.environ.get("BOARD_SCREENSHOT"):
                await asyncio.sleep(4.0)
                await asyncio.to_thread(browser.save_screenshot, path)
            await asyncio.gather(*calls)

            def both_ended() -> bool:
                return bool(browser.find_elements("css selector", "#ended li")) and not (
                    browser.find_elements("css selector", "#active li")
                )

            await until(both_ended, 90, "the conversation among the ended calls")
            expected = await kept_finals(settings_env["REDIS_URL"], prefix, list(ids.values()))

            def drawn() -> list[tuple[str, str, str, str, float]]:
                return [
                    (n.get_attribute("data-kind"), n.get_attribute("data-call"),
                     n.get_attribute("data-segment"), n.find_element("css selector", ".text").text,
                     float(n.get_attribute("data-at")))
                    for n in browser.find_elements("css selector", "#detail .line")
                ]  # fmt: skip

            def all_drawn() -> list[tuple[str, str, str, str, float]]:
                found = drawn()
                return found if sum(x[0] == "final" for x in found) >= len(expected) else []

            lines = await until(all_drawn, 30, "every final")
            history = await asyncio.to_thread(browser.execute_script, "return window.__lines")

            # the worker's pass: the ended conversation shows its results once they are in
            await drain(
                make_settings(settings_env, REDIS_CHANNEL_PREFIX=prefix), shared_model(model_dir)
            )

            def results_shown() -> str:
                text = str(browser.find_element("id", "detail").text)
                return text if text.count("Post-call transcript") == 3 else ""

            results = await until(results_shown, 30, "the post-call results")

            def alert_shown() -> tuple[str, str, str]:
                return (
                    " ".join(n.text for n in browser.find_elements("css selector", ".line.alert")),
                    browser.find_element("id", "alert-list").text,
                    browser.find_element("css selector", "#ended li").get_attribute("class"),
                )

            alert = await asyncio.to_thread(alert_shown)
        finally:
            await asyncio.to_thread(browser.quit)
    assert "caller" in badges and "agent" in badges  # two legs, one entry, by role
    assert relay.cuts == 1 and state == "reconnecting"
    shown = sorted((f"{c}/{s}", t) for k, c, s, t, _ in lines if k == "final")
    assert shown == expected  # every final once, none lost while the page was cut off
    assert len(expected) >= 6
    assert not [x for x in lines if x[0] == "partial"]  # every partial gave way to its final
    roles = {c: r for r, c in ids.items()}
    finals = [(at, roles[c]) for k, c, _, _, at in lines if k == "final"]
    assert [at for at, _ in finals] == sorted(at for at, _ in finals)  # one time line
    turns = sum(1 for a, b in itertools.pairwise(finals) if a[1] != b[1])
    assert turns >= 2  # both legs interleaved by time, not one after the other
    replaced = {(c, s) for k, c, s, _ in history if k == "partial"} & {
        (c, s) for k, c, s, _ in history if k == "final"
    }
    assert replaced, "no partial was ever drawn and then replaced by its final"
    assert "Post-call transcript of the conversation" in results
    assert "caller: " in results and "agent: " in results  # speaker-labelled, legs merged
    marked, listed, entry_class = alert
    assert "unlock the conference" in marked.lower()  # the matched line, highlighted
    assert "conference" in listed and "alerted" in entry_class  # listed on top, the entry flagged


async def test_the_board_stays_usable_with_200_running_calls(settings_env):
    """200 calls (published through a real server's publisher into Redis, without the model),
    each with its context and a final, partials flowing: all are listed, search finds one by
    its caller, and it opens large."""
    from tests.e2e import running_server
    from tests.test_events_feed import NO_MODEL, Emitter, final, partial, started

    settings = make_settings(settings_env, **NO_MODEL)
    async with running_server(settings) as server:
        calls = [Emitter(server, str(uuid.uuid4())) for _ in range(200)]
        for n, call in enumerate(calls):
            context = {"role": "caller", "caller": f"+2547{n:08d}", "queue": f"q{n % 7}"}
            server.publisher.emit(started(call.call_id, context), 1)
            server.publisher.emit(final(call.call_id, 0, f"sentence number {n}"), 2)
            call.seq = 2
        await calls[-1].emit()
        browser = await asyncio.to_thread(open_browser)
        try:
            await asyncio.to_thread(browser.get, f"http://127.0.0.1:{server.http_port}/")

            def listed() -> int:
                return len(browser.find_elements("css selector", "#active li"))

            await until(lambda: listed() == 200, 30, "200 running calls")
            for round_ in range(5):  # every call speaks again, as 200 live calls do
                for n, call in enumerate(calls):
                    call.seq += 1
                    text = f"still talking {round_} {n}"
                    server.publisher.emit(partial(call.call_id, 1, text), call.seq)
                await calls[-1].emit()
                await asyncio.sleep(0.5)
            search = await asyncio.to_thread(browser.find_element, "id", "search")
            await asyncio.to_thread(search.send_keys, "+254700000137")
            await until(lambda: listed() == 1, 10, "one call found by its caller")
            await asyncio.to_thread(browser.find_element("css selector", "#active li").click)

            def opened() -> str:
                return str(browser.find_element("id", "detail").text)

            detail = await until(lambda: "sentence number 137" in opened() and opened(), 10, "it")
            stats = await asyncio.to_thread(browser.execute_script, "return board.stats")
        finally:
            await asyncio.to_thread(browser.quit)
    assert "+254700000137" in detail and "q4" in detail  # 137 % 7 == 4
    print(f"board with 200 calls: {stats}")  # draw cost, for benchmarks/RESULTS.md
