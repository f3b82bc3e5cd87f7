"""A call's audio messages as 16-bit PCM at the call's own rate.

The rate of a call is that of its first audio message. A 0x10 message carries what
AUDIOSOCKET_0X10_FORMAT says (slin, ulaw or slin16); u-law is expanded to linear; a payload
that ends mid-sample waits for the rest. Audio at another rate than the call's (unusual) is
resampled, so that the recording keeps one rate.
"""

from __future__ import annotations

import numpy as np
import structlog

from streamsrv import audiosocket as aso
from streamsrv.audio import (
    FloatArray,
    PcmAssembler,
    StreamResampler,
    pcm16_to_float,
    ulaw_to_pcm16,
)

log = structlog.get_logger(__name__)


def pcm_of(kind: int, payload: bytes, format_0x10: str) -> tuple[int, bytes, bool]:
    """(sample rate, payload, is u-law) of an audio message, by kind and the 0x10 setting."""
    if kind == aso.Kind.AUDIO_8K:
        if format_0x10 == "ulaw":
            return 8000, payload, True
        if format_0x10 == "slin16":
            return 16000, payload, False
    return aso.AUDIO_RATES[kind], payload, False


class CallAudio:
    def __init__(self, call_id: str, format_0x10: str) -> None:
        self.call_id = call_id
        self.format_0x10 = format_0x10
        self._assembler = PcmAssembler()
        self._resampler: StreamResampler | None = None

    def convert(
        self, kind: int, payload: bytes, call_rate: int | None
    ) -> tuple[int, bytes, FloatArray | None]:
        """(the message's rate, its PCM at `call_rate` (None: the message's own), and that
        PCM as floats when resampling made them anyway)."""
        rate, payload, ulaw = pcm_of(kind, payload, self.format_0x10)
        pcm = ulaw_to_pcm16(payload) if ulaw else self._assembler.push(payload)
        if not pcm or call_rate is None or rate == call_rate:
            return rate, pcm, None
        if self._resampler is None or self._resampler.in_rate != rate:
            log.warning("sample_rate_changed", call_id=self.call_id, was=call_rate, now=rate)
            self._resampler = StreamResampler(rate, call_rate)
        out = self._resampler.push(pcm16_to_float(pcm))
        return rate, (np.clip(out, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes(), out
