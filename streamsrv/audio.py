"""PCM conversion, u-law decoding and streaming resampling to the model's 16 kHz.

AudioSocket delivers signed 16-bit little-endian PCM (or u-law bytes under 0x10 when a channel
driver leg is not forced to slin) at the rate its kind names. The model wants float32 mono at
16 kHz. The resampler keeps its filter state between frames, so a call resampled frame by frame
gives the same samples as the whole call resampled at once: no clicks at frame borders.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

MODEL_RATE = 16000

FloatArray = npt.NDArray[np.float32]


def _ulaw_table() -> npt.NDArray[np.int16]:
    """G.711 u-law to linear PCM, the standard expansion (as in ITU-T G.711 and audioop)."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


_ULAW = _ulaw_table()


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Expand u-law bytes to 16-bit little-endian PCM."""
    return _ULAW[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> FloatArray:
    """16-bit little-endian PCM to float32 in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class PcmAssembler:
    """Joins byte payloads into whole 16-bit samples.

    A payload may end in the middle of a sample (an odd length); the odd byte waits for the next
    payload instead of shifting every later sample by one byte.
    """

    def __init__(self) -> None:
        self._carry = b""

    def push(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
        cut = len(data) - (len(data) % 2)
        self._carry = data[cut:]
        return data[:cut]


class StreamResampler:
    """Streaming resampler from a call's rate to 16 kHz (soxr, high quality, stateful)."""

    def __init__(self, in_rate: int, out_rate: int = MODEL_RATE) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        )

    def push(self, samples: FloatArray) -> FloatArray:
        if self._stream is None:
            return samples
        out: FloatArray = self._stream.resample_chunk(samples, last=False)
        return out

    def flush(self) -> FloatArray:
        """The samples still held in the filter, at the end of a call."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out: FloatArray = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return out
