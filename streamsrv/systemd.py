"""The sd_notify protocol, spoken directly so that the server needs no libsystemd.

With Type=notify, systemd considers the service started only when it says READY=1 (after the
models are loaded and the listeners are open), shows its STATUS= line in `systemctl status`, and
treats STOPPING=1 as the start of a graceful stop. With WatchdogSec=, systemd expects WATCHDOG=1
at least every WatchdogSec once READY=1 was sent, and aborts and restarts the service when the
pings stop. The server sends them from its event loop tick, every `watchdog_interval` seconds,
not from a thread of their own: a stuck event loop (a blocking call, a deadlock) then stops the
pings and systemd restarts the service, while a thread would keep pinging for a dead loop.

Each message is one datagram of "KEY=value" lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET. Sending is non-blocking and never raises: outside systemd (no NOTIFY_SOCKET)
every method is a no-op, and a notification that cannot be delivered must never take the
server down, so failures are logged once and otherwise ignored.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when not started by systemd."""

    def __init__(self, address: str | None = None, watchdog_interval: float | None = None) -> None:
        """`address`: the socket path, or an abstract name starting with a NUL byte; None
        disables everything. `watchdog_interval`: seconds between WATCHDOG=1 pings, None for
        no watchdog (it is ignored without an address: there is nobody to ping)."""
        self.address = address
        self.enabled: bool = address is not None
        self.watchdog_interval: float | None = watchdog_interval if self.enabled else None
        self._sock: socket.socket | None = None
        self._failure_logged = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """The Notifier that systemd asked for through the environment it started us with.

        NOTIFY_SOCKET is a path, or "@name" for a socket in the abstract namespace. The watchdog
        is honoured only when WATCHDOG_PID is absent or is our own pid: otherwise the variables
        were inherited from a parent that systemd supervises, and pings from this process
        would not be accepted (and must not keep that parent alive). The pings are sent every
        half WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so that one late tick does
        not cost a restart.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None = None
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@") and len(raw) > 1:
            address = "\0" + raw[1:]
        elif raw:
            log.warning("sd_notify_socket_unsupported", notify_socket=raw)
        return cls(address, _watchdog_interval(environ))

    def notify(self, **fields: str) -> None:
        """Send one datagram "KEY=value" per line, e.g. notify(READY="1", STATUS="serving").

        Never blocks (a full systemd queue drops the message) and never raises; the first
        failure is logged, later ones are not, so a missing socket does not flood the log.
        Newlines in values are replaced by spaces: they would start a new field.
        """
        if self.address is None or not fields:
            return
        message = "\n".join(
            key + "=" + value.replace("\n", " ") for key, value in fields.items()
        ).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except Exception as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.warning(
                    "sd_notify_failed",
                    notify_socket=self.address.replace("\0", "@", 1),
                    error=repr(exc),
                    fields=sorted(fields),
                )

    def ready(self, status: str | None = None) -> None:
        """READY=1: start-up is complete (models loaded, listeners open); arms the watchdog."""
        if status is None:
            self.notify(READY="1")
        else:
            self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """STATUS=: the one-line state shown by `systemctl status` (e.g. the active calls)."""
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        """WATCHDOG=1, from the event loop tick every `watchdog_interval` seconds.

        Sends nothing when systemd set no watchdog for this process. Rate limiting is the
        caller's: the tick compares the time of the last ping with `watchdog_interval`.
        """
        if self.watchdog_interval is not None:
            self.notify(WATCHDOG="1")

    def stopping(self) -> None:
        """STOPPING=1: a graceful stop (drain) has begun; systemd also disarms the watchdog,
        so the drain is bounded by TimeoutStopSec= and not by WatchdogSec=."""
        self.notify(STOPPING="1")

    def close(self) -> None:
        """Release the socket (idempotent); a later notification would open a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds when the watchdog is meant for this process, else None."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
