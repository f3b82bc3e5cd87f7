"""Streaming voice activity detection with the Silero model that faster-whisper ships.

The model is an LSTM over 32 ms chunks (512 samples at 16 kHz, each with 64 samples of the
previous chunk as context). Carrying its state (h, c, context) per call lets it run on each
call's new audio only, chunk by chunk, and give the same probabilities as a pass over the
whole call. The session is shared by all calls; only the small state is per call.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from streamsrv.audio import FloatArray

CHUNK = 512
CONTEXT = 64
CHUNK_SECONDS = CHUNK / 16000


class SileroVad:
    """The shared ONNX session. run() is safe to call from one thread at a time per state."""

    def __init__(self) -> None:
        import onnxruntime
        from faster_whisper.utils import get_assets_path

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            os.path.join(get_assets_path(), "silero_vad_v6.onnx"),
            providers=["CPUExecutionProvider"],
            sess_options=opts,
        )

    def run(self, state: VadState, samples: FloatArray) -> npt.NDArray[np.float32]:
        """Speech probability of each whole chunk completed by `samples`, in order."""
        audio = np.concatenate([state.pending, samples]) if len(state.pending) else samples
        whole = len(audio) - len(audio) % CHUNK
        state.pending = audio[whole:].copy()
        if whole == 0:
            return np.zeros(0, dtype=np.float32)
        chunks = audio[:whole].reshape(-1, CHUNK)
        contexts = np.concatenate([state.context[None, :], chunks[:-1, -CONTEXT:]], axis=0)
        state.context = chunks[-1, -CONTEXT:].copy()
        batch = np.ascontiguousarray(np.concatenate([contexts, chunks], axis=1), np.float32)
        probs, state.h, state.c = self._session.run(
            None, {"input": batch, "h": state.h, "c": state.c}
        )
        return np.asarray(probs, dtype=np.float32).reshape(-1)


class VadState:
    """One call's place in the Silero stream."""

    def __init__(self) -> None:
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)
