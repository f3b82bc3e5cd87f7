"""`ingest`: hundreds of concurrent real-time calls with no live ASR (postcall_only), to measure
what taking calls costs by itself: socket reads, decoding, recordings, rows and jobs.

One asyncio task paces each call; the calls are shared among several worker processes because
one Python process cannot pace hundreds of 20 ms streams on time. Each worker reports how late
its frames left, so a client that could not keep up is visible rather than mistaken for the
server dropping audio.

Its cost is reported in two parts, as they scale differently: the steady state (CPU ms per
audio second, over a window in which every call is up and none starts or ends) and the start and
end of a call (CPU ms per call: the rest of the run's CPU, by difference; rows, journal, job,
publishes and the fsyncs that make them durable). Short calls pay the second part more often
per audio second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import calls as bc
from benchmarks import harness as h

CALLS_PER_PROCESS = 100
START_DELAY = 3.0  # s for the workers to spawn and import before the first call
EDGE = 0.5  # s kept between the steady window and the last start / the first end


@dataclass
class IngestResult(h.ServerFigures):
    calls: int
    seconds: float
    procs: int
    env: dict[str, str]
    audio_seconds: float
    cpu_ms_per_audio_s: float
    steady_ms_per_audio_s: float  # every call up, none starting or ending
    steady_window_s: float
    ms_per_call: float  # start and end of one call: the rest of the CPU, by difference
    calls_ended: int
    call_errors: int
    client_late_p99_ms: float
    client_late_max_ms: float

    @property
    def holds_bar(self) -> bool:
        return (
            self.frames_lost == 0
            and self.call_errors == 0
            and self.calls_ended == self.calls
            and abs(self.recorded_seconds - self.audio_seconds) < bc.FRAME_S / 2
        )


def _worker(host: str, port: int, calls: int, seconds: float, start_at: float, seed: int) -> Any:
    import uvloop

    return uvloop.run(_play_share(host, port, calls, seconds, start_at, seed))


async def _play_share(
    host: str, port: int, calls: int, seconds: float, start_at: float, seed: int
) -> dict[str, Any]:
    frames = bc.encode_frames(bc.synthetic_pcm(seconds, seed))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    outcomes = await asyncio.gather(
        *(bc.play(host, port, frames, delay=d) for d in bc.stagger(calls, seed)),
        return_exceptions=True,
    )
    played = [p for p in outcomes if isinstance(p, bc.Played)]
    return {
        "frames_sent": sum(p.frames_sent for p in played),
        "bytes_sent": sum(p.bytes_sent for p in played),
        "errors": [repr(e) for e in outcomes if not isinstance(e, bc.Played)],
        **bc.lateness_summary([x for p in played for x in p.lateness]),
    }


def _steady_window(
    server: h.ServerProcess, start_at: float, seconds: float
) -> tuple[h.Snapshot, h.Snapshot] | None:
    """Snapshots bracketing the time when every call is up and none has ended (calls start
    within STAGGER_SECONDS of start_at); None when the calls are too short to have one."""
    opens, closes = start_at + bc.STAGGER_SECONDS + EDGE, start_at + seconds - EDGE
    if closes - opens < 2.0:
        return None
    time.sleep(max(0.0, opens - time.time()))
    first = server.snapshot()
    time.sleep(max(0.0, closes - time.time()))
    return first, server.snapshot()


def _wait_calls_ended(
    server: h.ServerProcess, before: h.Snapshot, calls: int, timeout: float
) -> h.Snapshot:
    """Poll /metrics until `calls` more calls have ended and none is active."""
    deadline = time.monotonic() + timeout
    while True:
        now = server.snapshot()
        ended = h.delta(before, now, "streamsrv_calls_ended_total")
        if ended >= calls and h.total(now.metrics, "streamsrv_calls_active") == 0:
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def run_ingest(
    n_calls: int,
    seconds: float,
    procs: int | None,
    env: dict[str, str],
    env_file: Path = h.DEFAULT_ENV_FILE,
    seed: int = 0,
) -> IngestResult:
    procs = procs or max(1, math.ceil(n_calls / CALLS_PER_PROCESS))
    shares = [n_calls // procs + (1 if k < n_calls % procs else 0) for k in range(procs)]
    server = h.ServerProcess({"DEFAULT_PROCESSING_MODE": "postcall_only", **env}, env_file)
    with server:
        s = server.settings
        start_at = time.time() + START_DELAY
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=spawn) as pool:
            futures = [
                pool.submit(
                    _worker, s.audiosocket_host, s.audiosocket_port, n, seconds, start_at, seed + k
                )
                for k, n in enumerate(shares)
            ]
            time.sleep(max(0.0, start_at - time.time() - 0.1))
            before = server.snapshot()
            steady = _steady_window(server, start_at, seconds)
            workers = [f.result() for f in futures]
        after = _wait_calls_ended(server, before, n_calls, timeout=60 + s.drain_timeout)
        rss = server.peak_rss_mb()
        recorded = bc.recorded_seconds(server.recordings)
    frames_sent = sum(w["frames_sent"] for w in workers)
    audio_seconds = frames_sent * bc.FRAME_S
    cpu = after.cpu_seconds - before.cpu_seconds
    steady_ms, window = math.nan, 0.0
    if steady is not None:
        first, last = steady
        window = last.at - first.at
        steady_ms = 1000 * (last.cpu_seconds - first.cpu_seconds) / (n_calls * window)
    per_call = (1000 * cpu - steady_ms * audio_seconds) / n_calls
    return IngestResult(
        **h.server_figures(
            before,
            after,
            frames_sent=frames_sent,
            bytes_sent=sum(w["bytes_sent"] for w in workers),
            peak_rss_mb=rss,
            recorded_seconds=recorded,
        ),
        calls=n_calls,
        seconds=seconds,
        procs=procs,
        env=env,
        audio_seconds=audio_seconds,
        cpu_ms_per_audio_s=1000 * cpu / audio_seconds if audio_seconds else math.nan,
        steady_ms_per_audio_s=steady_ms,
        steady_window_s=window,
        ms_per_call=per_call,
        calls_ended=int(h.delta(before, after, "streamsrv_calls_ended_total")),
        call_errors=sum(len(w["errors"]) for w in workers),
        client_late_p99_ms=max(w["p99_ms"] for w in workers),
        client_late_max_ms=max(w["max_ms"] for w in workers),
    )
