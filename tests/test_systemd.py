"""sd_notify against real AF_UNIX datagram sockets, and the unit file against systemd-analyze."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from streamsrv import systemd
from streamsrv.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "streamsrv.service"
WORKER_UNIT = ROOT / "systemd" / "streamsrv-worker.service"
ARI_UNIT = ROOT / "systemd" / "streamsrv-ari.service"
BINARY = "/opt/streamsrv/.venv/bin/streamsrv"
EXEC_START = f"ExecStart={BINARY} serve"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL


class Receiver:
    """The systemd end: a bound datagram socket and the NOTIFY_SOCKET value that names it."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def receive(self) -> bytes:
        self.sock.settimeout(2.0)
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        """Whatever else has arrived (delivery is synchronous on AF_UNIX: no waiting needed)."""
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                return out


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    with contextlib.ExitStack() as stack:
        directory = tmp_path
        if len(str(directory / "notify.sock")) > MAX_UNIX_PATH:  # too long for sun_path
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdn")))
        path = directory / "notify.sock"
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        sock.bind(str(path))
        yield Receiver(sock, str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"streamsrv-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    fixture = "path_receiver" if request.param == "path" else "abstract_receiver"
    result: Receiver = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A logger not cached by an earlier structlog.configure(cache_logger_on_first_use=True)."""
    monkeypatch.setattr(systemd, "log", structlog.get_logger("streamsrv.systemd.test"))


# -- sd_notify ---------------------------------------------------------------------------------


def test_messages_are_exact_datagrams(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": receiver.notify_socket, "WATCHDOG_USEC": "10000000"}
    )
    assert notifier.enabled
    try:
        notifier.ready()
        assert receiver.receive() == b"READY=1"
        notifier.ready("model loaded, serving")
        assert receiver.receive() == b"READY=1\nSTATUS=model loaded, serving"
        notifier.status("3 calls")
        assert receiver.receive() == b"STATUS=3 calls"
        notifier.watchdog()
        assert receiver.receive() == b"WATCHDOG=1"
        notifier.stopping()
        assert receiver.receive() == b"STOPPING=1"
        notifier.notify(EXTEND_TIMEOUT_USEC="60000000", STATUS="joining model")
        assert receiver.receive() == b"EXTEND_TIMEOUT_USEC=60000000\nSTATUS=joining model"
        assert receiver.pending() == []
    finally:
        notifier.close()


def test_newlines_cannot_inject_fields(path_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket})
    notifier.status("line one\nREADY=1")
    assert path_receiver.receive() == b"STATUS=line one READY=1"
    notifier.close()


def test_close_is_idempotent_and_a_later_message_reopens(path_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket})
    notifier.close()  # before any socket exists
    notifier.status("a")
    notifier.close()
    notifier.close()
    notifier.status("b")
    notifier.close()
    assert [path_receiver.receive(), path_receiver.receive()] == [b"STATUS=a", b"STATUS=b"]


@pytest.mark.parametrize("pid", [None, "self"])
def test_watchdog_interval_is_half_of_watchdog_usec(
    path_receiver: Receiver, pid: str | None
) -> None:
    environ = {"NOTIFY_SOCKET": path_receiver.notify_socket, "WATCHDOG_USEC": "10000000"}
    if pid is not None:
        environ["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environ(environ).watchdog_interval == 5.0


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"},  # the parent's watchdog, not ours
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
)
def test_no_watchdog_for_us_means_no_pings(path_receiver: Receiver, extra: dict[str, str]) -> None:
    if extra.get("WATCHDOG_PID") == "1":
        assert os.getpid() != 1
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket, **extra})
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.watchdog()
    notifier.ready()  # everything but the watchdog still works
    notifier.close()
    assert path_receiver.pending() == [b"READY=1"]


@pytest.mark.parametrize(
    "environ",
    [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/notify.sock"}, {"NOTIFY_SOCKET": "@"}],
)
def test_without_a_usable_notify_socket_everything_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environ({**environ, "WATCHDOG_USEC": "10000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.notify(STATUS="x")
    notifier.close()


def test_missing_socket_path_does_not_raise_and_logs_once(tmp_path: Path, fresh_log: None) -> None:
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": str(tmp_path / "absent.sock"), "WATCHDOG_USEC": "2000000"}
    )
    with capture_logs() as logs:
        notifier.ready("x")
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    failures = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "warning"
    assert "FileNotFoundError" in failures[0]["error"]


def test_a_full_systemd_queue_does_not_block(path_receiver: Receiver, fresh_log: None) -> None:
    """Nobody reads: the receiver's queue fills, and sending must drop instead of blocking."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket})
    done = threading.Event()

    def flood() -> None:
        for i in range(10_000):
            notifier.status(f"{i}")
        done.set()

    with capture_logs() as logs:
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        thread.join(timeout=10)
    notifier.close()
    assert done.is_set(), "notify() blocked on a full socket queue"
    failures = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(failures) == 1
    assert "BlockingIOError" in failures[0]["error"]
    assert path_receiver.receive() == b"STATUS=0"


# -- the unit file -----------------------------------------------------------------------------

# A verify message attributed to some unit or unit file: "<unit>: ..." or "<path>:<line>: ...".
_ATTRIBUTED = re.compile(
    r"^(?P<unit>[^\s:]+\.(?:service|socket|target|mount|automount|swap|path|timer|slice|scope|"
    r"device))(?::\d+)?:"
)


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return analyze


def _supports_recursive_errors(analyze: str) -> bool:
    """--recursive-errors= (systemd 250+) makes warnings about the unit itself fail verify."""
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"systemd (\d+)", out.stdout)
    return match is not None and int(match.group(1)) >= 250


def _testable_copy(text: str, directory: Path, name: str = UNIT.name) -> Path:
    """The unit with only ExecStart's binary replaced by one that exists (verify checks it)."""
    assert text.count(f"ExecStart={BINARY} ") == 1
    copy = directory / name  # same unit name: verify derives it from the file name
    copy.write_text(text.replace(f"ExecStart={BINARY} ", f"ExecStart={sys.executable} "))
    return copy


def _verify_problems(unit: Path) -> list[str]:
    """What `systemd-analyze verify` reports against this unit: non-zero exit status, and every
    output line except those clearly about some other unit (a dependency such as
    network-online.target may have its own issues on this host, which are not ours)."""
    analyze = _analyze()
    command = [analyze, "verify", "--man=no"]
    if _supports_recursive_errors(analyze):
        command.append("--recursive-errors=no")
    environ = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [*command, str(unit)], capture_output=True, text=True, env=environ, timeout=60, check=False
    )
    problems = []
    for line in (result.stdout + result.stderr).splitlines():
        match = _ATTRIBUTED.match(line.strip())
        if not line.strip() or (match and Path(match["unit"]).name != unit.name):
            continue
        problems.append(line)
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}")
    return problems


@pytest.mark.parametrize("unit", [UNIT, WORKER_UNIT, ARI_UNIT], ids=lambda unit: unit.name)
def test_unit_files_verify_cleanly(tmp_path: Path, unit: Path) -> None:
    copy = _testable_copy(unit.read_text(), tmp_path, unit.name)
    assert _verify_problems(copy) == []


def test_the_worker_unit_runs_the_worker_as_the_server_runs() -> None:
    """Same user, environment file, working directory and sandbox as the server (it reads the
    server's recordings); a stop lets running jobs finish."""
    server, worker = _settings(UNIT.read_text()), _settings(WORKER_UNIT.read_text())
    assert worker["ExecStart"] == [f"{BINARY} worker"]
    for key in ("EnvironmentFile", "WorkingDirectory", "User", "Group", "ReadWritePaths"):
        assert worker[key] == server[key], key
    sandbox = {k: v for k, v in server.items() if k.startswith(("Protect", "Restrict", "Private"))}
    assert {k: worker.get(k) for k in sandbox} == sandbox
    assert worker["KillSignal"] == ["SIGTERM"] and int(worker["TimeoutStopSec"][0]) >= 300


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\nRestartSec=2\n", "\nRestartSecs=2\n"),  # misspelt directive
        ("\nType=notify\n", "\nType=notifyy\n"),  # bad value
        ("\nWatchdogSec=30\n", "\nWatchdogSec=thirty\n"),  # unparsable time span
        ("\n[Install]\n", "\n[Instal]\n"),  # misspelt section
        ("\nUser=streamsrv\n", "\nUser=stream srv\n"),  # an unattributed warning line
    ],
)
def test_verify_check_catches_broken_units(tmp_path: Path, old: str, new: str) -> None:
    """The check above is meaningful: the same unit with one mistake fails it."""
    text = UNIT.read_text()
    assert text.count(old) == 1
    unit = _testable_copy(text.replace(old, new), tmp_path)
    assert _verify_problems(unit) != []


def test_verify_checks_that_the_binary_exists(tmp_path: Path) -> None:
    """Why the tests point ExecStart at an existing binary."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(EXEC_START, f"ExecStart={tmp_path}/absent serve"))
    assert any("absent" in problem for problem in _verify_problems(unit))


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_settings_the_server_relies_on() -> None:
    settings = _settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/streamsrv/.venv/bin/streamsrv serve",
        "EnvironmentFile": "/etc/streamsrv/streamsrv.env",
        "WorkingDirectory": "/var/lib/streamsrv",
        "StateDirectory": "streamsrv",
        "User": "streamsrv",
        "Group": "streamsrv",
        "Restart": "on-failure",
        "WatchdogSec": "30",
        "TimeoutStartSec": "300",
        "TimeoutStopSec": "90",
        "KillMode": "mixed",
        "KillSignal": "SIGTERM",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "WantedBy": "multi-user.target",
    }
    assert {key: settings.get(key) for key in expected} == {
        key: [value] for key, value in expected.items()
    }
    # CTranslate2 / onnxruntime / CUDA may need W+X memory; PrivateDevices would hide /dev/nvidia*.
    assert "MemoryDenyWriteExecute" not in settings
    assert settings["PrivateDevices"] == ["false"]
    # Drain (DRAIN_TIMEOUT, 30 s by default) and flush must fit in the stop timeout.
    assert int(settings["TimeoutStopSec"][0]) > 30
