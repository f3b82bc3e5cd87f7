"""RingBuffer: absolute-index reads of the retained window, eviction, capacity boundaries."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamsrv.ringbuffer import RingBuffer


def _fill(rb: RingBuffer, sizes: list[int]) -> np.ndarray:
    """Append consecutive numbered samples in chunks of `sizes`; return their concatenation."""
    total = np.arange(sum(sizes), dtype=np.float32)
    pos = 0
    for n in sizes:
        rb.append(total[pos : pos + n])
        pos += n
    return total


def _check_reads(rb: RingBuffer, everything: np.ndarray, ranges: list[tuple[int, int]]) -> None:
    held_from = max(0, len(everything) - rb.capacity)
    assert rb.end == len(everything)
    assert rb.start == held_from
    # the whole retained window
    np.testing.assert_array_equal(rb.read(rb.start, rb.end), everything[held_from:])
    for a, b in ranges:
        lo, hi = max(a, held_from), min(b, len(everything))
        expected = everything[lo:hi] if hi > lo else everything[:0]
        got = rb.read(a, b)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected, err_msg=f"read({a}, {b})")


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    capacity=st.integers(min_value=1, max_value=40),
)
def test_reads_equal_slices_of_the_concatenation_small_chunks(
    data: st.DataObject, capacity: int
) -> None:
    """Chunks shorter than the capacity, including ones that wrap around the end."""
    sizes = data.draw(st.lists(st.integers(min_value=0, max_value=capacity - 1), max_size=30))
    rb = RingBuffer(capacity)
    everything = _fill(rb, sizes)
    total = len(everything)
    ranges = data.draw(
        st.lists(
            st.tuples(
                st.integers(min_value=-5, max_value=total + 5),
                st.integers(min_value=-5, max_value=total + 5),
            ),
            max_size=10,
        )
    )
    _check_reads(rb, everything, ranges)


@settings(max_examples=300, deadline=None)
@example(capacity=4, sizes=[1, 4])
@example(capacity=4, sizes=[5])
@given(
    capacity=st.integers(min_value=1, max_value=40),
    sizes=st.lists(st.integers(min_value=0, max_value=100), max_size=20),
)
def test_reads_equal_slices_of_the_concatenation_any_chunks(
    capacity: int, sizes: list[int]
) -> None:
    rb = RingBuffer(capacity)
    everything = _fill(rb, sizes)
    total = len(everything)
    step = max(1, total // 10)
    edges = sorted({-1, 0, rb.start - 1, rb.start, rb.start + 1, total - 1, total, total + 1})
    points = sorted({*range(-1, total + 2, step), *edges})
    ranges = [(a, b) for a in points for b in points if b >= a]
    _check_reads(rb, everything, ranges)


def test_evicted_ranges_clip_to_what_is_held() -> None:
    rb = RingBuffer(10)
    everything = _fill(rb, [6, 6, 6])  # 18 samples, 8..17 held
    assert rb.start == 8
    np.testing.assert_array_equal(rb.read(0, 12), everything[8:12])
    np.testing.assert_array_equal(rb.read(0, 100), everything[8:18])
    assert len(rb.read(0, 8)) == 0  # wholly evicted
    assert len(rb.read(2, 5)) == 0
    assert len(rb.read(18, 30)) == 0  # not yet arrived
    assert len(rb.read(12, 12)) == 0
    assert len(rb.read(14, 11)) == 0  # reversed


def test_empty_buffer_reads_nothing() -> None:
    rb = RingBuffer(8)
    assert (rb.start, rb.end) == (0, 0)
    assert len(rb.read(0, 8)) == 0
    rb.append(np.zeros(0, dtype=np.float32))
    assert rb.end == 0


def test_read_returns_a_copy() -> None:
    rb = RingBuffer(8)
    _fill(rb, [5])
    got = rb.read(0, 5)
    got[:] = -1
    np.testing.assert_array_equal(rb.read(0, 5), np.arange(5, dtype=np.float32))


def test_append_exactly_capacity_into_an_empty_buffer() -> None:
    rb = RingBuffer(16)
    everything = _fill(rb, [16])
    assert (rb.start, rb.end) == (0, 16)
    _check_reads(rb, everything, [(0, 16), (3, 9), (10, 16)])


def test_fill_to_capacity_in_pieces_then_wrap() -> None:
    rb = RingBuffer(16)
    everything = _fill(rb, [10, 6])
    _check_reads(rb, everything, [(0, 16), (5, 12)])
    everything = np.arange(16 + 5, dtype=np.float32)
    rb.append(everything[16:])
    assert rb.start == 5
    _check_reads(rb, everything, [(0, 21), (14, 19), (5, 21), (15, 17)])


def test_appending_whole_multiples_of_capacity_keeps_the_newest() -> None:
    rb = RingBuffer(16)
    everything = _fill(rb, [32, 16])  # ends stay multiples of the capacity
    assert rb.start == 32
    _check_reads(rb, everything, [(0, 48), (40, 44)])


def test_append_more_than_capacity_into_an_empty_buffer() -> None:
    rb = RingBuffer(16)
    everything = _fill(rb, [20])
    assert rb.start == 4
    np.testing.assert_array_equal(rb.read(4, 20), everything[4:20])


def test_append_exactly_capacity_after_a_partial_fill() -> None:
    rb = RingBuffer(16)
    everything = _fill(rb, [3, 16])
    assert rb.start == 3
    np.testing.assert_array_equal(rb.read(3, 19), everything[3:19])
