"""`streamsrv demo`: one recorded call into a running server, its live transcript on screen."""

from __future__ import annotations

import asyncio
import sys
import uuid

from streamsrv import corpus, events
from streamsrv.config import Settings
from streamsrv.simulate import CallWatcher, LiveView, play_call
from streamsrv.wer import wer


async def run_demo(settings: Settings, prompts: int, speed: float, seed: int) -> int:
    try:
        call = corpus.build_call(corpus.pick_prompts(prompts, seed))
    except corpus.CorpusMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    call_id = str(uuid.uuid4())
    host = settings.audiosocket_host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = settings.audiosocket_port
    print(f"call {call_id}: {call.seconds:.1f} s of recorded prompts -> {host}:{port}")
    view = LiveView()
    channel = events.Channels(settings.redis_channel_prefix).call(call_id)
    async with CallWatcher(settings.redis_url, channel) as watcher:
        try:
            player = asyncio.create_task(
                play_call(host, port, call.pcm, call_id=call_id, speed=speed)
            )
            async for message in watcher.messages(idle=60):
                view.apply(message)
                kind = message["type"]
                if kind == "partial":
                    print(f"  ... [{message['segment']}] {message['text']}")
                elif kind == "final":
                    print(f"final [{message['segment']}] {message['text']}")
                elif kind in ("call_started", "call_ended", "dtmf"):
                    details = {k: v for k, v in message.items() if k not in ("type", "call_id")}
                    print(f"{kind}: {details}")
                if kind == "call_ended":
                    break
            await player
        except OSError as exc:
            print(f"cannot reach streamsrv: {exc} (is `make run` running?)", file=sys.stderr)
            return 1
    print(f"\nreference:  {call.reference}\ntranscript: {view.text}")
    print(f"WER: {wer(call.reference, view.text):.1%}")
    return 0
