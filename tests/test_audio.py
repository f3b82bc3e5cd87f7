"""u-law decoding, sample assembly across odd payloads and streaming resampling."""

from __future__ import annotations

import audioop
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsrv.audio import (
    MODEL_RATE,
    PcmAssembler,
    StreamResampler,
    pcm16_to_float,
    ulaw_to_pcm16,
)

IN_RATES = [8000, 12000, 24000, 32000, 44100, 48000, 96000]


def test_ulaw_matches_audioop_for_every_code() -> None:
    codes = bytes(range(256))
    ours = np.frombuffer(ulaw_to_pcm16(codes), dtype="<i2")
    reference = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype="<i2")
    mismatched = [
        (code, int(a), int(b))
        for code, (a, b) in enumerate(zip(ours, reference, strict=True))
        if a != b
    ]
    assert mismatched == []


def test_ulaw_keeps_order_and_length_of_a_mixed_stream() -> None:
    data = bytes([0x00, 0xFF, 0x7F, 0x80, 0x12, 0xEE] * 50)
    out = ulaw_to_pcm16(data)
    assert len(out) == 2 * len(data)
    assert out == audioop.ulaw2lin(data, 2)


def test_pcm16_to_float_scale() -> None:
    pcm = np.array([-32768, -16384, 0, 16384, 32767], dtype="<i2").tobytes()
    out = pcm16_to_float(pcm)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:4], [-1.0, -0.5, 0.0, 0.5])
    assert 0.9999 < out[4] < 1.0


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_assembler_random_splits_give_the_whole(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    assembler = PcmAssembler()
    outputs = [assembler.push(piece) for piece in pieces]
    assert all(len(out) % 2 == 0 for out in outputs)
    assert b"".join(outputs) == data[: len(data) - len(data) % 2]


def test_assembler_odd_payloads_do_not_shift_samples() -> None:
    samples = np.arange(-500, 500, 7, dtype="<i2")
    raw = samples.tobytes()
    assembler = PcmAssembler()
    out = b""
    # 3-byte payloads: every other one ends mid-sample
    for i in range(0, len(raw), 3):
        out += assembler.push(raw[i : i + 3])
    np.testing.assert_array_equal(np.frombuffer(out, dtype="<i2"), samples)


def _resample_whole(rate: int, signal: np.ndarray) -> np.ndarray:
    resampler = StreamResampler(rate)
    return np.concatenate([resampler.push(signal), resampler.flush()])


def _resample_in_pieces(rate: int, signal: np.ndarray, points: list[int]) -> np.ndarray:
    resampler = StreamResampler(rate)
    bounds = [0, *sorted(points), len(signal)]
    outs = [resampler.push(signal[a:b]) for a, b in itertools.pairwise(bounds)]
    return np.concatenate([*outs, resampler.flush()])


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.2).astype(np.float32)


@pytest.mark.parametrize("rate", IN_RATES)
def test_resampler_chunked_equals_whole(rate: int) -> None:
    signal = _noise(rate // 2 + 37, seed=rate)
    whole = _resample_whole(rate, signal)
    rng = np.random.default_rng(rate)
    for _ in range(3):
        points = rng.integers(0, len(signal), size=rng.integers(1, 40)).tolist()
        pieces = _resample_in_pieces(rate, signal, points)
        assert len(pieces) == len(whole)
        np.testing.assert_allclose(pieces, whole, atol=1e-5)
    # frame by frame, as a call arrives (20 ms frames)
    frame = rate // 50
    by_frame = _resample_in_pieces(rate, signal, list(range(frame, len(signal), frame)))
    np.testing.assert_allclose(by_frame, whole, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    rate=st.sampled_from(IN_RATES),
    points=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_resampler_random_chunking_property(rate: int, points: list[int]) -> None:
    signal = _noise(4000, seed=1)
    whole = _resample_whole(rate, signal)
    pieces = _resample_in_pieces(rate, signal, points)
    assert len(pieces) == len(whole)
    np.testing.assert_allclose(pieces, whole, atol=1e-5)


@pytest.mark.parametrize("rate", IN_RATES)
@pytest.mark.parametrize("n", [1000, 12345, 48000])
def test_resampler_total_length(rate: int, n: int) -> None:
    out = _resample_in_pieces(rate, _noise(n), [n // 3, n // 2])
    expected = n * MODEL_RATE / rate
    assert abs(len(out) - expected) <= 3, (len(out), expected)
    assert out.dtype == np.float32


def _peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


def test_resampled_sine_keeps_its_frequency_and_level() -> None:
    t = np.arange(8000 * 2) / 8000
    sine = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = _resample_in_pieces(8000, sine, list(range(160, len(sine), 160)))
    assert abs(len(out) - 2 * len(sine)) <= 2
    steady = out[1600:-1600]  # away from the filter's edges
    assert abs(_peak_hz(steady, MODEL_RATE) - 1000) <= 2
    # the level is kept and no image appears at 8000 - 1000 = 7000 Hz
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    freqs = np.fft.rfftfreq(len(steady), 1 / MODEL_RATE)
    image = spectrum[(freqs > 6900) & (freqs < 7100)].max()
    assert image < spectrum.max() * 1e-3


def test_same_rate_is_identity() -> None:
    signal = _noise(3210)
    resampler = StreamResampler(16000, 16000)
    out = resampler.push(signal[:1000])
    np.testing.assert_array_equal(out, signal[:1000])
    np.testing.assert_array_equal(resampler.push(signal[1000:]), signal[1000:])
    assert len(resampler.flush()) == 0
