"""A real `streamsrv serve` in a subprocess, and what it shows from outside: /health, /metrics,
and the kernel's accounting of its CPU time and memory.

Running the server as its own process (not on the benchmark's event loop) is what makes its CPU
time, peak RSS and event-loop lag its own, measured the way an operator would see them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamsrv.config import Settings, read_env_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = ROOT / "configs" / "streamsrv.env"
SERVICES_ENV = ROOT / ".run" / "services.env"
STREAMSRV = Path(sys.executable).with_name("streamsrv")  # the venv running the benchmark
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_env_args(pairs: list[str]) -> dict[str, str]:
    """--env KEY=VALUE arguments as a dict; a pair without '=' is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def base_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment, then .run/services.env, then `env`."""
    services = read_env_file(SERVICES_ENV) if SERVICES_ENV.exists() else {}
    return {**os.environ, **services, **env}


def bench_settings(env: dict[str, str], env_file: Path = DEFAULT_ENV_FILE) -> Settings:
    """The settings a benchmark server gets (ports and prefix aside): for reports."""
    return Settings.load(env_file, environ=base_env(env))


@dataclass(frozen=True)
class Snapshot:
    """The server's counters at one moment: /metrics and CPU seconds (user + system)."""

    at: float
    cpu_seconds: float
    metrics: dict[str, float]


class ServerProcess:
    """`streamsrv serve` with its own ports, channel prefix and recordings directory.

    Environment, lowest priority first: this process's, .run/services.env (the service URLs
    `make services` chose), `env` (e.g. --env KEY=VALUE), then what the benchmark must own."""

    def __init__(self, env: dict[str, str], env_file: Path = DEFAULT_ENV_FILE) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="streamsrv-bench-"))
        self.recordings = self.workdir / "recordings"
        self.log_path = self.workdir / "server.log"
        self.env_file = env_file
        self.env = {
            **base_env(env),
            "AUDIOSOCKET_HOST": "127.0.0.1",
            "AUDIOSOCKET_PORT": str(free_port()),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(free_port()),
            "REDIS_CHANNEL_PREFIX": f"bench{secrets.token_hex(4)}:",
            "RECORDINGS_DIR": str(self.recordings),
            "LOG_FORMAT": "json",
        }
        self.settings = Settings.load(env_file, environ=self.env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.health: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}{path}"

    def start(self, timeout: float = 180.0) -> None:
        """Start and wait until /health answers with a loaded model and Redis reachable."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(STREAMSRV), "serve", "--env-file", str(self.env_file)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamsrv exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError, ValueError):
                health = json.loads(http_get(self.url("/health"), timeout=2))
                if health.get("model") in ("ok", "disabled") and health.get("redis") == "ok":
                    self.health = health
                    return
            time.sleep(0.2)
        raise RuntimeError(f"streamsrv not healthy after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (graceful drain), SIGKILL if it outstays `timeout`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.stop()
        if exc_type is not None:  # the log goes with the temporary directory: show its end
            print(f"streamsrv log (last lines):\n{self.tail()}", file=sys.stderr)
        self.cleanup()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def snapshot(self) -> Snapshot:
        return Snapshot(time.time(), cpu_seconds(self.pid), scrape(self.url("/metrics")))

    def peak_rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode()


def http_post(url: str, fields: dict[str, str], timeout: float = 5.0) -> str:
    """POST `fields` form-encoded, as Asterisk's CURL() does; an error status raises."""
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(url, data=data, timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces: skip past it
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def proc_status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return float(line.split()[1])
    return math.nan


def scrape(url: str) -> dict[str, float]:
    return parse_metrics(http_get(url))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format as {'name{labels}': value} (labels exactly as rendered)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def total(metrics: dict[str, float], name: str) -> float:
    """A metric summed over its label sets (0 when absent)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def delta(before: Snapshot, after: Snapshot, name: str) -> float:
    return total(after.metrics, name) - total(before.metrics, name)


def buckets(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets as (upper bound, count), ascending, +Inf last."""
    prefix = f'{name}_bucket{{le="'
    out = [
        (float(k[len(prefix) : k.index('"', len(prefix))]), v)
        for k, v in metrics.items()
        if k.startswith(prefix)
    ]
    return sorted(out)


def histogram_quantile(
    q: float, before: dict[str, float], after: dict[str, float], name: str
) -> float:
    """Quantile q (0-1) of the observations made between two scrapes, interpolated within a
    bucket as Prometheus' histogram_quantile does; inf when it lies in the +Inf bucket, nan
    when nothing was observed."""
    earlier = dict(buckets(before, name))
    counts = [(le, n - earlier.get(le, 0.0)) for le, n in buckets(after, name)]
    if not counts or counts[-1][1] <= 0:
        return math.nan
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if math.isinf(le):
                return math.inf
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return math.inf


def histogram_mean(before: Snapshot, after: Snapshot, name: str) -> float:
    count = delta(before, after, f"{name}_count")
    return delta(before, after, f"{name}_sum") / count if count else math.nan


@dataclass
class ServerFigures:
    """What every run measures on the server between two snapshots, live and ingest alike."""

    server_cpu_s: float
    peak_rss_mb: float
    loop_lag_p99: float
    frames_sent: int
    frames_received: int
    frames_lost: int
    bytes_sent: int
    bytes_received: int
    recorded_seconds: float


def server_figures(
    before: Snapshot,
    after: Snapshot,
    *,
    frames_sent: int,
    bytes_sent: int,
    peak_rss_mb: float,
    recorded_seconds: float,
) -> dict[str, Any]:
    """The ServerFigures fields of a run whose client sent `frames_sent` frames and
    `bytes_sent` payload bytes, as keywords for a result built on ServerFigures."""
    frames_received = int(delta(before, after, "streamsrv_frames_received_total"))
    return {
        "server_cpu_s": after.cpu_seconds - before.cpu_seconds,
        "peak_rss_mb": peak_rss_mb,
        "loop_lag_p99": histogram_quantile(
            0.99, before.metrics, after.metrics, "streamsrv_event_loop_lag_seconds"
        ),
        "frames_sent": frames_sent,
        "frames_received": frames_received,
        "frames_lost": frames_sent - frames_received,
        "bytes_sent": bytes_sent,
        "bytes_received": int(delta(before, after, "streamsrv_bytes_received_total")),
        "recorded_seconds": recorded_seconds,
    }
