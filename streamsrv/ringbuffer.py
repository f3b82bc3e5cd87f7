"""Fixed-capacity sample buffer addressed by absolute sample index.

A call's audio is addressed by its position since the call's first frame, so a request to the
model names exactly which samples it covers, however much audio arrived since. Old audio falls
off the front; only the open segment and a little context are ever needed.
"""

from __future__ import annotations

import numpy as np

from streamsrv.audio import FloatArray


class RingBuffer:
    def __init__(self, capacity: int) -> None:
        self._data = np.zeros(capacity, dtype=np.float32)
        self.capacity = capacity
        self.end = 0  # absolute index one past the newest sample

    @property
    def start(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self.end - self.capacity)

    def append(self, samples: FloatArray) -> None:
        n = len(samples)
        if n >= self.capacity:
            # keep the newest `capacity` samples, each at its absolute index modulo capacity
            self.end += n
            self._data[:] = np.roll(samples[-self.capacity :], self.start % self.capacity)
            return
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos : pos + first] = samples[:first]
        self._data[: n - first] = samples[first:]
        self.end += n

    def read(self, start: int, end: int) -> FloatArray:
        """A copy of samples [start, end); the range is clipped to what is held."""
        start = max(start, self.start)
        end = min(end, self.end)
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        a, b = start % self.capacity, end % self.capacity
        if a < b:
            return self._data[a:b].copy()
        return np.concatenate([self._data[a:], self._data[:b]])
