"""BatchExecutor with plain Python batch functions: batching, priority, keys, shedding, errors.

Ordering is controlled with threading.Events: the first batch blocks in the worker thread until
the test has queued everything it wants taken together, then releases it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import pytest

from streamsrv.asr.executor import BatchExecutor, QueueFull

WAIT = 10  # seconds: a safety net against hangs, never a timing assertion


class Recorder:
    """A batch function that records its batches and can hold the first one."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: ("done", x), hold: bool = True):
        self.fn = fn
        self.batches: list[list[Any]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, items: list[Any]) -> list[Any]:
        with self._lock:
            self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never released the batch"
        return [self.fn(x) for x in items]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT)


def make(
    run: Callable[[list[Any]], list[Any]],
    *,
    batch_size: int = 4,
    adaptive: bool = True,
    min_batch_size: int = 1,
    max_batch_size: int = 8,
    max_queue_size: int = 50,
    workers: int = 1,
    observer: Callable[[int, float, float], None] | None = None,
) -> BatchExecutor[Any, Any]:
    ex: BatchExecutor[Any, Any] = BatchExecutor(
        run,
        batch_size=batch_size,
        adaptive=adaptive,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_queue_size=max_queue_size,
        workers=workers,
        observer=observer,
    )
    ex.start()
    return ex


@pytest.fixture
async def closers() -> AsyncIterator[list[BatchExecutor[Any, Any]]]:
    """Executors to close at the end of a test, even a failed one."""
    started: list[BatchExecutor[Any, Any]] = []
    yield started
    for ex in started:
        await asyncio.wait_for(ex.close(), WAIT)


async def gather(futures: list[asyncio.Future[Any]]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*futures), WAIT)


async def blocked(
    rec: Recorder, closers: list[BatchExecutor[Any, Any]], **kwargs: Any
) -> tuple[BatchExecutor[Any, Any], asyncio.Future[Any]]:
    """An executor whose worker is busy with a first batch ("first") until rec.gate is set."""
    ex = make(rec, **kwargs)
    closers.append(ex)
    first = ex.submit("first", key="block")
    await rec.wait_entered()
    return ex, first


async def test_results_go_to_the_right_futures(closers: list[Any]) -> None:
    ex = make(lambda items: [x * x for x in items], max_batch_size=3, workers=2)
    closers.append(ex)
    futures = [ex.submit(i) for i in range(40)]
    assert await gather(futures) == [i * i for i in range(40)]


async def test_adaptive_takes_what_queued_behind_a_slow_batch(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=True, max_batch_size=8)
    futures = [ex.submit(i, key="block") for i in range(12)]
    assert ex.queued == 12
    rec.gate.set()
    assert await gather([first, *futures]) == [("done", x) for x in ["first", *range(12)]]
    assert rec.batches == [["first"], list(range(8)), list(range(8, 12))]


async def test_adaptive_idle_server_answers_a_single_request_at_once(closers: list[Any]) -> None:
    rec = Recorder(hold=False)
    ex = make(rec, adaptive=True, min_batch_size=1, max_batch_size=8)
    closers.append(ex)
    for i in range(3):
        assert await gather([ex.submit(i)]) == [("done", i)]
    assert rec.batches == [[0], [1], [2]]


async def test_non_adaptive_uses_batch_size(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=False, batch_size=3, max_batch_size=8)
    futures = [ex.submit(i, key="block") for i in range(8)]
    rec.gate.set()
    await gather([first, *futures])
    assert rec.batches == [["first"], [0, 1, 2], [3, 4, 5], [6, 7]]


async def test_lower_priority_number_runs_first(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=False, batch_size=1)
    order = [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", 2), ("f", 1)]
    futures = [ex.submit(name, priority=prio, key="block") for name, prio in order]
    rec.gate.set()
    await gather([first, *futures])
    # by priority, first come first served within one priority
    assert rec.batches[1:] == [["b"], ["d"], ["c"], ["f"], ["a"], ["e"]]


async def test_priority_picks_the_key_of_the_next_batch(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=True, max_batch_size=8)
    futures = [
        ex.submit("p1", priority=1, key="partial"),
        ex.submit("p2", priority=1, key="partial"),
        ex.submit("f1", priority=0, key="final"),
        ex.submit("f2", priority=0, key="final"),
    ]
    rec.gate.set()
    await gather([first, *futures])
    assert rec.batches[1:] == [["f1", "f2"], ["p1", "p2"]]


async def test_items_are_only_batched_with_the_same_key(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=True, max_batch_size=8)
    keys: list[Hashable] = ["en", "sw", "en", None, "sw", "en", None]
    futures = [ex.submit(f"{key}-{i}", key=key) for i, key in enumerate(keys)]
    rec.gate.set()
    results = await gather([first, *futures])
    assert results[1:] == [("done", f"{key}-{i}") for i, key in enumerate(keys)]
    assert rec.batches[1:] == [["en-0", "en-2", "en-5"], ["sw-1", "sw-4"], ["None-3", "None-6"]]


async def test_sheddable_items_are_refused_past_max_queue_size(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=False, batch_size=1, max_queue_size=3)
    accepted = [ex.submit(f"partial{i}", sheddable=True) for i in range(3)]
    with pytest.raises(QueueFull):
        ex.submit("partial3", sheddable=True)
    # finals are never shed
    finals = [ex.submit(f"final{i}") for i in range(3)]
    assert ex.queued == 6
    with pytest.raises(QueueFull):
        ex.submit("partial4", sheddable=True)
    rec.gate.set()
    results = await gather([first, *accepted, *finals])
    assert [r[1] for r in results] == ["first"] + [f"partial{i}" for i in range(3)] + [
        f"final{i}" for i in range(3)
    ]
    assert all("partial3" not in b and "partial4" not in b for b in rec.batches)
    # once drained, sheddable items are taken again
    assert await gather([ex.submit("later", sheddable=True)]) == [("done", "later")]


async def test_an_exception_fails_only_its_batch(closers: list[Any]) -> None:
    def fn(x: str) -> str:
        if x == "bad":
            raise ValueError("boom")
        return x.upper()

    rec = Recorder(fn)
    ex, first = await blocked(rec, closers, adaptive=True, max_batch_size=8)
    doomed = [ex.submit("ok1", key="x"), ex.submit("bad", key="x")]
    fine = [ex.submit("ok2", key="y"), ex.submit("ok3", key="y")]
    rec.gate.set()
    done = await asyncio.wait_for(
        asyncio.gather(first, *doomed, *fine, return_exceptions=True), WAIT
    )
    assert done[0] == "FIRST"
    assert all(isinstance(r, ValueError) for r in done[1:3])
    assert done[3:] == ["OK2", "OK3"]
    assert rec.batches[1:] == [["ok1", "bad"], ["ok2", "ok3"]]
    # the worker survived
    assert await gather([ex.submit("again")]) == ["AGAIN"]


async def test_a_wrong_number_of_results_fails_that_batch(closers: list[Any]) -> None:
    ex = make(lambda items: items[:-1] if "short" in items else items)
    closers.append(ex)
    with pytest.raises(RuntimeError, match="gave"):
        await asyncio.wait_for(ex.submit("short"), WAIT)
    assert await gather([ex.submit("fine")]) == ["fine"]


async def test_a_cancelled_caller_does_not_break_the_executor(closers: list[Any]) -> None:
    rec = Recorder()
    ex, first = await blocked(rec, closers, adaptive=True, max_batch_size=8)
    first.cancel()
    queued = ex.submit("queued", key="block")
    queued.cancel()
    keep = ex.submit("keep", key="block")
    rec.gate.set()
    assert await gather([keep]) == [("done", "keep")]
    assert await gather([ex.submit("after")]) == [("done", "after")]


async def test_close_finishes_queued_work(closers: list[Any]) -> None:
    rec = Recorder()
    ex = make(rec, adaptive=False, batch_size=2)
    first = ex.submit("first")
    await rec.wait_entered()
    futures = [ex.submit(i) for i in range(5)]
    closing = asyncio.create_task(ex.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the first batch is still held: close must wait for it
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit("too late")
    rec.gate.set()
    await asyncio.wait_for(closing, WAIT)
    assert ex.queued == 0
    assert await gather([first, *futures]) == [("done", x) for x in ["first", *range(5)]]
    assert rec.batches == [["first"], [0, 1], [2, 3], [4]]


async def test_workers_run_batches_concurrently(closers: list[Any]) -> None:
    barrier = threading.Barrier(2, timeout=WAIT)

    def run(items: list[str]) -> list[str]:
        barrier.wait()  # breaks (and fails both batches) unless two batches are in flight
        return items

    ex = make(run, adaptive=False, batch_size=1, workers=2)
    closers.append(ex)
    assert await gather([ex.submit("a"), ex.submit("b")]) == ["a", "b"]


async def test_observer_gets_size_seconds_and_wait(closers: list[Any]) -> None:
    seen: list[tuple[int, float, float]] = []
    seen_lock = threading.Lock()

    def observer(size: int, seconds: float, waited: float) -> None:
        with seen_lock:
            seen.append((size, seconds, waited))

    def fn(x: Any) -> Any:
        if x == "bad":
            raise ValueError(x)
        return x

    rec = Recorder(fn)
    ex = make(rec, adaptive=True, max_batch_size=8, observer=observer)
    first = ex.submit("first")
    await rec.wait_entered()
    t_entered = time.monotonic()  # the first batch started before this
    rest = [ex.submit(i) for i in range(5)]
    t_queued = time.monotonic()  # the second batch was queued before this
    bad = ex.submit("bad", key="other")
    await asyncio.sleep(0.02)
    t_release = time.monotonic()  # the first batch ends, and the second starts, after this
    rec.gate.set()
    await gather([first, *rest])
    with pytest.raises(ValueError):
        await asyncio.wait_for(bad, WAIT)
    await asyncio.wait_for(ex.close(), WAIT)  # the observer runs after the futures resolve
    assert [size for size, _, _ in seen] == [1, 5, 1]  # failed batches are observed too
    for _, seconds, waited in seen:
        assert seconds >= 0
        assert waited >= 0
    # bounds that follow from the order of events, whatever the machine's speed
    assert seen[0][1] >= t_release - t_entered
    assert seen[1][2] >= t_release - t_queued
