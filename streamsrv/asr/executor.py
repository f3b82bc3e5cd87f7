"""Batching executor: many callers, one model, batches run in worker threads.

The caller awaits one result for one input; worker threads take what is queued, highest
priority first, group items that can share a batch (same key), run them as one call and resolve
each caller's future on the event loop. Errors go to the futures of that batch only. It knows
nothing about Whisper: the batch function is plugged in, so it is tested with a plain function.

Batch size: BATCH_SIZE when ADAPTIVE_BATCHING is off; otherwise whatever is queued, shared out
among the idle workers, between MIN_BATCH_SIZE and MAX_BATCH_SIZE, so an idle server answers one
request at once and a busy one amortises the model over many calls. Up to `workers` batches run
at a time (MAX_CONCURRENT_GPU_REQUESTS on a GPU, CPU_WORKERS on a CPU). MAX_QUEUE_SIZE bounds
pending work: past it, submissions that may be shed (partials) are refused, while those that
must not be lost (finals) are always taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The executor has MAX_QUEUE_SIZE pending items and this one may be shed."""


@dataclass(order=True)
class _Pending(Generic[T, R]):
    priority: int
    seq: int
    key: Hashable = field(compare=False)
    item: T = field(compare=False)
    future: asyncio.Future[R] = field(compare=False)
    queued_at: float = field(compare=False)


BatchObserver = Callable[[int, float, float], None]  # size, seconds running, seconds waited


class BatchExecutor(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        *,
        batch_size: int,
        adaptive: bool,
        min_batch_size: int,
        max_batch_size: int,
        max_queue_size: int,
        workers: int = 1,
        observer: BatchObserver | None = None,
        name: str = "asr",
    ) -> None:
        self._run_batch = run_batch
        self._batch_size = batch_size
        self._adaptive = adaptive
        self._min = min_batch_size
        self._max = max_batch_size
        self._max_queue = max_queue_size
        self._workers = workers
        self._observer = observer
        self._name = name
        self._pending: list[_Pending[T, R]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.in_flight = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(
        self, item: T, *, priority: int = 0, key: Hashable = None, sheddable: bool = False
    ) -> asyncio.Future[R]:
        """Queue one item; lower priority numbers run first. Raises QueueFull for sheddable
        items past MAX_QUEUE_SIZE."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("executor is closed")
            if sheddable and len(self._pending) >= self._max_queue:
                raise QueueFull
            self._pending.append(
                _Pending(priority, next(self._seq), key, item, future, time.monotonic())
            )
            self._cond.notify()
        return future

    def _target_size(self, available: int) -> int:
        """BATCH_SIZE, or adaptively the queued items shared out among the idle workers, so
        that two workers split a queue of eight rather than one taking all of it."""
        if not self._adaptive:
            return self._batch_size
        idle = max(1, self._workers - self.in_flight)
        return max(self._min, min(self._max, -(-available // idle)))

    def _take(self) -> list[_Pending[T, R]]:
        """The next batch: the most urgent item and those queued with the same key."""
        first = min(self._pending)
        same = sorted(p for p in self._pending if p.key == first.key)
        batch = same[: self._target_size(len(same))]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._take()
                self.in_flight += 1
            started = time.monotonic()
            try:
                results = self._run_batch([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:
                log.exception("batch_failed", executor=self._name, size=len(batch))
                for p in batch:
                    _resolve(p.future, None, exc)
            else:
                for p, result in zip(batch, results, strict=True):
                    _resolve(p.future, result, None)
            finally:
                with self._cond:
                    self.in_flight -= 1
                done = time.monotonic()
                if self._observer is not None:
                    waited = started - min(p.queued_at for p in batch)
                    self._observer(len(batch), done - started, waited)

    async def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)


def _resolve(future: asyncio.Future[R], result: R | None, exc: BaseException | None) -> None:
    def apply() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        future.get_loop().call_soon_threadsafe(apply)
