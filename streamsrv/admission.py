"""Who may connect, and how fast: ALLOWED_PEERS and the connection rate limit.

AudioSocket has no authentication, so the first line of defence is the address: only peers in
ALLOWED_PEERS (CIDR list; empty means any) are served. A token bucket bounds how many new
connections a second are accepted (CONNECTION_RATE_LIMIT, with a burst of the same size), so a
connection flood costs a few system calls per rejected socket and nothing more. Pure logic.
"""

from __future__ import annotations

import ipaddress
import time


class PeerFilter:
    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: str) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        """One token if there is one: True when the connection may proceed."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
