"""The live model as the server runs it: the Whisper runner behind the batching executor,
and Silero VAD, loaded off the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from streamsrv.asr.executor import BatchExecutor
from streamsrv.asr.models import resolve_model
from streamsrv.asr.vad import SileroVad
from streamsrv.asr.whisper import AsrRequest, AsrResult, WhisperRunner
from streamsrv.config import Settings
from streamsrv.metrics import Metrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LiveModel:
    executor: BatchExecutor[AsrRequest, AsrResult]  # started
    vad: SileroVad
    name: str  # for /health: "tiny.en (cpu, int8)"
    english_only: bool  # an .en model: a context asking for another language is refused


async def load_live_model(settings: Settings, metrics: Metrics) -> LiveModel:
    """Resolve and load the model (ModelNotFound when it is nowhere), start the executor."""
    s = settings
    device = s.device
    name = s.realtime_model_name(device)
    path = await asyncio.to_thread(resolve_model, name, s.model_dir)
    runner = await asyncio.to_thread(
        WhisperRunner, path, device, s.realtime_whisper_compute_type, s
    )
    vad = await asyncio.to_thread(SileroVad)
    executor = BatchExecutor(
        runner.run_batch,
        batch_size=s.batch_size,
        adaptive=s.adaptive_batching,
        min_batch_size=s.min_batch_size,
        max_batch_size=s.max_batch_size,
        max_queue_size=s.max_queue_size,
        workers=s.live_workers(device),
        observer=metrics.observe_batch,
    )
    executor.start()
    metrics.queue_length.set_function(lambda: executor.queued)  # read at each scrape
    log.info(
        "model_loaded",
        model=name,
        path=path,
        device=device,
        compute_type=s.realtime_whisper_compute_type,
    )
    label = f"{name} ({device}, {s.realtime_whisper_compute_type})"
    return LiveModel(executor, vad, label, not runner.multilingual)
