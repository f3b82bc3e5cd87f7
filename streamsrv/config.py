"""One typed Settings object, read from the environment and env files, validated once.

Every variable has a default that works on one machine; configs/streamsrv.env lists them all
with their meaning. The names follow the performance guide where they apply. Settings is
immutable and passed down explicitly: nothing below the CLI reads the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamsrv import alerts

PROCESSING_MODES = ("realtime_only", "postcall_only", "hybrid")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_TYPES = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)
AUDIO_0X10_FORMATS = ("slin", "ulaw", "slin16")
LOG_FORMATS = ("auto", "json", "console")


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def _cidrs(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    for item in items:
        ipaddress.ip_network(item, strict=False)
    return items


def _optional_str(text: str) -> str | None:
    return text.strip() or None


def _optional_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _alert_rules(text: str) -> alerts.AlertRules | None:
    """ALERT_PHRASES: the rules of the file it names, read and compiled once; empty: none."""
    return alerts.load(Path(text.strip())) if text.strip() else None


def _var(
    env: str,
    default: Any,
    parse: Callable[[str], Any] = str,
    doc: str = "",
    aliases: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    return field(
        default=default,
        repr=not secret,  # a secret never reaches a log line through repr(settings)
        metadata={"env": env, "parse": parse, "doc": doc, "aliases": aliases},
    )


@dataclass(frozen=True)
class Settings:
    """All of streamsrv's configuration. Field metadata names the environment variable."""

    audiosocket_host: str = _var("AUDIOSOCKET_HOST", "127.0.0.1")
    audiosocket_port: int = _var("AUDIOSOCKET_PORT", 9092, int)
    audiosocket_0x10_format: str = _var(
        "AUDIOSOCKET_0X10_FORMAT", "slin", _choice(AUDIO_0X10_FORMATS)
    )
    http_host: str = _var("HTTP_HOST", "127.0.0.1")
    http_port: int = _var("HTTP_PORT", 8125, int)
    http_token: str = _var("HTTP_TOKEN", "", secret=True)
    http_allowed_peers: tuple[str, ...] = _var("HTTP_ALLOWED_PEERS", (), _cidrs)
    board_user: str = _var("BOARD_USER", "supervisor")
    board_password: str = _var("BOARD_PASSWORD", "", secret=True)
    board_recent_calls: int = _var("BOARD_RECENT_CALLS", 50, int)
    context_pending_seconds: float = _var("CONTEXT_PENDING_SECONDS", 600.0, float)
    context_pending_max: int = _var("CONTEXT_PENDING_MAX", 10_000, int)
    redis_url: str = _var("REDIS_URL", "redis://127.0.0.1:6379/0")
    redis_channel_prefix: str = _var("REDIS_CHANNEL_PREFIX", "streamsrv:")
    redis_backlog: int = _var("REDIS_BACKLOG", 10000, int)
    redis_stream_maxlen: int = _var("REDIS_STREAM_MAXLEN", 1000, int)
    redis_stream_ttl: int = _var("REDIS_STREAM_TTL", 86400, int)
    database_url: str = _var("DATABASE_URL", "postgresql://localhost/streamsrv")
    recordings_dir: Path = _var("RECORDINGS_DIR", Path("recordings"), Path)
    spool_dir: Path = _var("SPOOL_DIR", Path("spool"), Path)
    model_dir: Path = _var("MODEL_DIR", Path("models"), Path)
    whisper_device: str = _var("WHISPER_DEVICE", "auto", _choice(DEVICES))
    realtime_whisper_model: str | None = _var("REALTIME_WHISPER_MODEL", None, _optional_str)
    realtime_whisper_compute_type: str = _var(
        "REALTIME_WHISPER_COMPUTE_TYPE", "int8", _choice(COMPUTE_TYPES)
    )
    postcall_whisper_model: str | None = _var("POSTCALL_WHISPER_MODEL", None, _optional_str)
    postcall_whisper_compute_type: str | None = _var(
        "POSTCALL_WHISPER_COMPUTE_TYPE", None, _optional_str
    )
    cpu_threads: int = _var("CPU_THREADS", 0, int)
    cpu_workers: int = _var("CPU_WORKERS", 0, int)
    batch_size: int = _var("BATCH_SIZE", 4, int)
    adaptive_batching: bool = _var("ADAPTIVE_BATCHING", True, _bool)
    min_batch_size: int = _var("MIN_BATCH_SIZE", 1, int)
    max_batch_size: int = _var("MAX_BATCH_SIZE", 8, int)
    max_concurrent_gpu_requests: int = _var("MAX_CONCURRENT_GPU_REQUESTS", 2, int)
    max_queue_size: int = _var("MAX_QUEUE_SIZE", 50, int)
    streaming_buffer_size: int = _var("STREAMING_BUFFER_SIZE", 320, int)
    streaming_chunk_size: int = _var("STREAMING_CHUNK_SIZE", 32000, int)
    streaming_interval: float = _var("STREAMING_INTERVAL", 0.1, float)
    partial_interval: float = _var("PARTIAL_INTERVAL", 0.6, float)
    tcp_buffer_size: int = _var("TCP_BUFFER_SIZE", 65536, int)
    tcp_socket_timeout: float = _var("TCP_SOCKET_TIMEOUT", 30.0, float)
    default_processing_mode: str = _var(
        "DEFAULT_PROCESSING_MODE", "hybrid", _choice(PROCESSING_MODES)
    )
    language: str = _var("LANGUAGE", "auto")
    language_detect_seconds: float = _var("LANGUAGE_DETECT_SECONDS", 3.0, float)
    language_detect_probability: float = _var("LANGUAGE_DETECT_PROBABILITY", 0.6, float)
    alert_rules: alerts.AlertRules | None = _var("ALERT_PHRASES", None, _alert_rules)
    alert_on_partials: bool = _var("ALERT_ON_PARTIALS", False, _bool)
    final_beam_size: int | None = _var("FINAL_BEAM_SIZE", None, _optional_int)
    contextless_final_beam_size: int = _var("CONTEXTLESS_FINAL_BEAM_SIZE", 5, int)
    condition_on_previous_text: bool = _var("CONDITION_ON_PREVIOUS_TEXT", False, _bool)
    final_context: bool = _var("FINAL_CONTEXT", True, _bool)
    final_context_segments: int = _var("FINAL_CONTEXT_SEGMENTS", 2, int)
    vad_threshold: float = _var("VAD_THRESHOLD", 0.5, float)
    vad_min_silence_ms: int = _var("VAD_MIN_SILENCE_MS", 500, int)
    vad_speech_pad_ms: int = _var("VAD_SPEECH_PAD_MS", 200, int)
    vad_min_speech_ms: int = _var("VAD_MIN_SPEECH_MS", 200, int)
    max_segment_seconds: float = _var("MAX_SEGMENT_SECONDS", 20.0, float)
    soft_segment_seconds: float = _var("SOFT_SEGMENT_SECONDS", 6.0, float)
    min_window_seconds: float = _var("MIN_WINDOW_SECONDS", 15.0, float)
    partial_window_seconds: float = _var("PARTIAL_WINDOW_SECONDS", 8.0, float)
    no_speech_threshold: float = _var("NO_SPEECH_THRESHOLD", 0.6, float)
    log_prob_threshold: float = _var("LOG_PROB_THRESHOLD", -1.0, float)
    compression_ratio_threshold: float = _var("COMPRESSION_RATIO_THRESHOLD", 2.4, float)
    drain_timeout: float = _var("DRAIN_TIMEOUT", 30.0, float)
    max_calls: int = _var("MAX_CALLS", 1000, int)
    max_call_seconds: float = _var("MAX_CALL_SECONDS", 14400.0, float)
    call_id_timeout: float = _var("CALL_ID_TIMEOUT", 5.0, float)
    max_pending_connections: int = _var("MAX_PENDING_CONNECTIONS", 256, int)
    max_pending_per_peer: int = _var("MAX_PENDING_PER_PEER", 64, int)
    allowed_peers: tuple[str, ...] = _var("ALLOWED_PEERS", (), _cidrs)
    log_level: str = _var("LOG_LEVEL", "info")
    log_format: str = _var("LOG_FORMAT", "auto", _choice(LOG_FORMATS))
    # post-call pass
    queue_priority_enabled: bool = _var("QUEUE_PRIORITY_ENABLED", True, _bool)
    worker_concurrency: int = _var("WORKER_CONCURRENCY", 2, int)
    max_retries: int = _var("CELERY_MAX_RETRIES", 3, int, aliases=("MAX_RETRIES",))
    retry_backoff: float = _var("RETRY_BACKOFF", 30.0, float)
    job_lease_seconds: float = _var("JOB_LEASE_SECONDS", 60.0, float)
    worker_poll_interval: float = _var("WORKER_POLL_INTERVAL", 2.0, float)
    worker_metrics_host: str = _var("WORKER_METRICS_HOST", "127.0.0.1")
    worker_metrics_port: int = _var("WORKER_METRICS_PORT", 9109, int)
    postcall_beam_size: int = _var("POSTCALL_BEAM_SIZE", 5, int)
    include_translation: bool = _var("INCLUDE_TRANSLATION", False, _bool)
    include_insights: bool = _var("INCLUDE_INSIGHTS", True, _bool)
    cache_results: bool = _var("CACHE_RESULTS", True, _bool)
    result_cache_ttl: int = _var("RESULT_CACHE_TTL", 3600, int)
    max_upload_bytes: int = _var("MAX_UPLOAD_BYTES", 100_000_000, int)
    # `streamsrv ari`: both directions of bridged calls through Asterisk's REST Interface
    ari_url: str = _var("ARI_URL", "http://127.0.0.1:8088")
    ari_user: str = _var("ARI_USER", "streamsrv")
    ari_password: str = _var("ARI_PASSWORD", "", secret=True)
    ari_app: str = _var("ARI_APP", "streamsrv")
    ari_audiosocket_address: str = _var("ARI_AUDIOSOCKET_ADDRESS", "")
    ari_streamsrv_url: str = _var("ARI_STREAMSRV_URL", "")
    ari_language_variable: str = _var("ARI_LANGUAGE_VARIABLE", "STREAMSRV_LANGUAGE")
    ari_queue_variable: str = _var("ARI_QUEUE_VARIABLE", "STREAMSRV_QUEUE")
    ari_metrics_host: str = _var("ARI_METRICS_HOST", "127.0.0.1")
    ari_metrics_port: int = _var("ARI_METRICS_PORT", 9108, int)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """Cross-field and range checks; each problem names its variable."""
        ports = [
            (0 <= getattr(self, n) <= 65535, f"{env_name(n)}: {getattr(self, n)} is not a TCP port")
            for n in ("audiosocket_port", "http_port")
        ]
        checks = [*ports, *_live_checks(self), *_service_checks(self), *_postcall_checks(self)]
        checks += _ari_checks(self)
        return [message for ok, message in checks if not ok]

    @property
    def device(self) -> str:
        """The device to run on: WHISPER_DEVICE, with auto resolved by what CTranslate2 sees."""
        if self.whisper_device != "auto":
            return self.whisper_device
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"

    def realtime_model_name(self, device: str) -> str:
        if self.realtime_whisper_model:
            return self.realtime_whisper_model
        return "base" if device == "cuda" else "tiny.en"

    def postcall_model_name(self, device: str) -> str:
        if self.postcall_whisper_model:
            return self.postcall_whisper_model
        return "large-v3" if device == "cuda" else "base"

    def live_workers(self, device: str) -> int:
        """Batches the live model runs at once: MAX_CONCURRENT_GPU_REQUESTS on a GPU; on a CPU
        CPU_WORKERS, by default one per core (CTranslate2 on one thread each gets more done
        than one batch on all threads: 2.5x on the 2-core machine, benchmarks/RESULTS.md)."""
        if device == "cuda":
            return self.max_concurrent_gpu_requests
        return self.cpu_workers or len(os.sched_getaffinity(0))

    def threads_per_worker(self, workers: int) -> int:
        """CPU_THREADS, or with 0 the cores shared out among the workers."""
        return self.cpu_threads or max(1, len(os.sched_getaffinity(0)) // workers)

    def final_beam(self, device: str) -> int:
        """Beam size of live finals: FINAL_BEAM_SIZE, else 5 on a GPU and greedy on a CPU,
        where beam search costs a third more per final for no measured gain in WER."""
        if self.final_beam_size is not None:
            return self.final_beam_size
        return 5 if device == "cuda" else 1

    def contextless_final_beam(self, device: str) -> int:
        """Beam size of a final that no earlier segment leads (a call's first, or one whose
        predecessor is still pending or was noise): CONTEXTLESS_FINAL_BEAM_SIZE, never less
        than final_beam. Such a final hears only its own few seconds padded with silence."""
        return max(self.final_beam(device), self.contextless_final_beam_size)

    def postcall_compute_type(self, device: str) -> str:
        if self.postcall_whisper_compute_type:
            return self.postcall_whisper_compute_type
        return "float16" if device == "cuda" else "int8"

    @property
    def live_asr(self) -> bool:
        return self.default_processing_mode != "postcall_only"

    @property
    def postcall_jobs(self) -> bool:
        return self.default_processing_mode != "realtime_only"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        """Build Settings from variables; unknown names are ignored, bad values all reported."""
        kwargs: dict[str, Any] = {}
        problems: list[str] = []
        for f in dataclasses.fields(cls):
            names = (f.metadata["env"], *f.metadata["aliases"])
            env = next((name for name in names if name in values), None)
            if env is None:
                continue
            try:
                kwargs[f.name] = f.metadata["parse"](values[env])
            except alerts.RulesError as exc:  # one problem per line of the file
                problems += [f"{env}: {problem}" for problem in exc.problems]
            except ValueError as exc:
                problems.append(f"{env}: {exc}")
        try:
            settings = cls(**kwargs)
        except ConfigError as exc:  # range and cross-field problems of the values that parsed
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return settings

    @classmethod
    def load(
        cls, env_file: Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from an env file, overridden by the process environment."""
        values: dict[str, str] = {}
        if env_file is not None:
            values.update(read_env_file(env_file))
        values.update(os.environ if environ is None else environ)
        return cls.from_mapping(values)


def env_name(field_name: str) -> str:
    for f in dataclasses.fields(Settings):
        if f.name == field_name:
            return str(f.metadata["env"])
    raise KeyError(field_name)


def known_variables() -> set[str]:
    return {str(f.metadata["env"]) for f in dataclasses.fields(Settings)}


def _live_checks(s: Settings) -> list[tuple[bool, str]]:
    """Batching, streaming, VAD and windows of the live model."""
    return [
        (s.batch_size >= 1, "BATCH_SIZE: must be at least 1"),
        (s.min_batch_size >= 1, "MIN_BATCH_SIZE: must be at least 1"),
        (
            s.min_batch_size <= s.max_batch_size,
            "MIN_BATCH_SIZE: must not exceed MAX_BATCH_SIZE",
        ),
        (s.max_concurrent_gpu_requests >= 1, "MAX_CONCURRENT_GPU_REQUESTS: at least 1"),
        (s.max_queue_size >= 1, "MAX_QUEUE_SIZE: must be at least 1"),
        (s.streaming_chunk_size >= 1600, "STREAMING_CHUNK_SIZE: at least 1600 (0.1 s)"),
        (0.01 <= s.streaming_interval <= 5, "STREAMING_INTERVAL: between 0.01 and 5 s"),
        (s.partial_interval > 0, "PARTIAL_INTERVAL: must be positive"),
        (s.tcp_socket_timeout > 0, "TCP_SOCKET_TIMEOUT: must be positive"),
        (s.tcp_buffer_size >= 1024, "TCP_BUFFER_SIZE: at least 1024"),
        (
            s.final_beam_size is None or 1 <= s.final_beam_size <= 10,
            "FINAL_BEAM_SIZE: between 1 and 10, or empty",
        ),
        (
            1 <= s.contextless_final_beam_size <= 10,
            "CONTEXTLESS_FINAL_BEAM_SIZE: between 1 and 10",
        ),
        (
            1 <= s.final_context_segments <= 4,
            "FINAL_CONTEXT_SEGMENTS: between 1 and 4",
        ),
        (0 < s.vad_threshold < 1, "VAD_THRESHOLD: between 0 and 1"),
        (s.vad_min_silence_ms >= 100, "VAD_MIN_SILENCE_MS: at least 100"),
        (
            2 <= s.max_segment_seconds <= 28,
            "MAX_SEGMENT_SECONDS: between 2 and 28 (a Whisper window is 30 s)",
        ),
        (
            s.soft_segment_seconds == 0 or s.soft_segment_seconds >= 1,
            "SOFT_SEGMENT_SECONDS: 0 (off) or at least 1 (past MAX_SEGMENT_SECONDS it never acts)",
        ),
        (
            1 <= s.min_window_seconds <= 30,
            "MIN_WINDOW_SECONDS: between 1 and 30",
        ),
        (
            1 <= s.partial_window_seconds <= 30,
            "PARTIAL_WINDOW_SECONDS: between 1 and 30",
        ),
    ]


def _service_checks(s: Settings) -> list[tuple[bool, str]]:
    """Calls, connections, Redis, Postgres, threads, language."""
    return [
        (s.drain_timeout >= 0, "DRAIN_TIMEOUT: must not be negative"),
        (s.max_calls >= 1, "MAX_CALLS: at least 1"),
        (s.max_call_seconds > 0, "MAX_CALL_SECONDS: must be positive"),
        (s.call_id_timeout > 0, "CALL_ID_TIMEOUT: must be positive"),
        (s.max_pending_connections >= 1, "MAX_PENDING_CONNECTIONS: at least 1"),
        (s.max_pending_per_peer >= 1, "MAX_PENDING_PER_PEER: at least 1"),
        (s.redis_backlog >= 1, "REDIS_BACKLOG: at least 1"),
        (s.redis_stream_maxlen >= 1, "REDIS_STREAM_MAXLEN: at least 1"),
        (s.redis_stream_ttl >= 1, "REDIS_STREAM_TTL: at least 1 second"),
        (0 <= s.board_recent_calls <= 500, "BOARD_RECENT_CALLS: 0 to 500"),
        (s.cpu_threads >= 0, "CPU_THREADS: must not be negative (0 = all cores)"),
        (s.cpu_workers >= 0, "CPU_WORKERS: must not be negative (0 = one per core)"),
        (
            s.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "REDIS_URL: must start with redis://, rediss:// or unix://",
        ),
        (
            s.database_url.startswith(("postgresql://", "postgres://")),
            "DATABASE_URL: must start with postgresql://",
        ),
        (
            s.language == "auto" or (2 <= len(s.language) <= 3 and s.language.isalpha()),
            f"LANGUAGE: {s.language!r} is not a Whisper language code or auto",
        ),
    ]


def _postcall_checks(s: Settings) -> list[tuple[bool, str]]:
    return [
        (s.worker_concurrency >= 1, "WORKER_CONCURRENCY: at least 1"),
        (s.max_retries >= 0, "CELERY_MAX_RETRIES: must not be negative"),
        (s.retry_backoff >= 0, "RETRY_BACKOFF: must not be negative"),
        (s.job_lease_seconds >= 1, "JOB_LEASE_SECONDS: at least 1"),
        (s.worker_poll_interval > 0, "WORKER_POLL_INTERVAL: must be positive"),
        (0 <= s.worker_metrics_port <= 65535, "WORKER_METRICS_PORT: 0 (off) to 65535"),
        (1 <= s.postcall_beam_size <= 10, "POSTCALL_BEAM_SIZE: between 1 and 10"),
        (s.result_cache_ttl >= 1, "RESULT_CACHE_TTL: at least 1 second"),
        (s.max_upload_bytes >= 1, "MAX_UPLOAD_BYTES: at least 1"),
        (s.context_pending_seconds > 0, "CONTEXT_PENDING_SECONDS: must be positive"),
        (s.context_pending_max >= 1, "CONTEXT_PENDING_MAX: at least 1"),
        (
            0.5 <= s.language_detect_seconds <= 30,
            "LANGUAGE_DETECT_SECONDS: between 0.5 and 30",
        ),
        (
            0 < s.language_detect_probability < 1,
            "LANGUAGE_DETECT_PROBABILITY: between 0 and 1",
        ),
    ]


def _ari_checks(s: Settings) -> list[tuple[bool, str]]:
    host, _, port = s.ari_audiosocket_address.rpartition(":")
    return [
        (s.ari_url.startswith(("http://", "https://")), "ARI_URL: must start with http(s)://"),
        (
            re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s.ari_app) is not None,
            "ARI_APP: 1 to 64 of A-Z a-z 0-9 _ . -",
        ),
        (
            not s.ari_audiosocket_address or (bool(host) and port.isdigit()),
            "ARI_AUDIOSOCKET_ADDRESS: HOST:PORT, or empty for AUDIOSOCKET_HOST:AUDIOSOCKET_PORT",
        ),
        (
            not s.ari_streamsrv_url or s.ari_streamsrv_url.startswith(("http://", "https://")),
            "ARI_STREAMSRV_URL: must start with http(s)://, or be empty for HTTP_HOST:HTTP_PORT",
        ),
        *(
            (
                re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value) is not None,
                f"{name}: a channel variable name",
            )
            for name, value in (
                ("ARI_LANGUAGE_VARIABLE", s.ari_language_variable),
                ("ARI_QUEUE_VARIABLE", s.ari_queue_variable),
            )
        ),
        (0 <= s.ari_metrics_port <= 65535, "ARI_METRICS_PORT: 0 (off) to 65535"),
    ]


def variable_aliases() -> dict[str, str]:
    """Other accepted names -> the variable's own name (the primary name wins when both are set)."""
    return {
        alias: str(f.metadata["env"])
        for f in dataclasses.fields(Settings)
        for alias in f.metadata["aliases"]
    }


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a systemd-style EnvironmentFile: KEY=value lines, # comments, optional quotes."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            problems.append(f"{path}:{number}: not a KEY=value line: {raw!r}")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    if problems:
        raise ConfigError(problems)
    return values
