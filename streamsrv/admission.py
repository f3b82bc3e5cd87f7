"""Who may connect, and how many may wait to say who they are.

AudioSocket has no authentication, so the first line of defence is the address: only peers in
ALLOWED_PEERS (CIDR list; empty means any) are served. Past that, a connection is a call as
soon as its first message is a valid call id (Asterisk sends it at once), and a call is only
bound by MAX_CALLS. The limits bind connections that have not identified yet: at most
MAX_PENDING_CONNECTIONS at once, MAX_PENDING_PER_PEER from one address, each for at most
CALL_ID_TIMEOUT. Past a limit, the oldest pending connections in that scope make room (they
have had the longest to identify), but never one younger than a second (the grace: a real
call's id may still be on its way) nor one whose call id is already waiting in its socket (a
call about to be read). Only past four times MAX_PENDING_CONNECTIONS does the grace give way,
so that a flood cannot run the process out of descriptors. A flood thus costs a socket and a
close per connection and cannot take a real call's place, even from the PBX's own address.
PeerFilter and PendingConnections are pure logic (the clock and whether a call id is waiting
are the caller's); Admission applies them to connections, counts every refusal in
connections_refused_total and logs the first at once, the rest summed up once a second.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

import structlog

from streamsrv.config import Settings
from streamsrv.metrics import Metrics

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)


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


class PendingConnections(Generic[K]):
    """Connections that have not sent their call id, oldest first, in total and per peer."""

    def __init__(self, total: int, per_peer: int, grace: float = 1.0, ceiling: int = 4) -> None:
        self.total = total
        self.per_peer = per_peer
        self.grace = grace  # seconds every connection gets, while under the ceiling
        self.hard_total = total * ceiling  # past this, even the youngest make room
        self._all: dict[K, tuple[str, float]] = {}  # connection -> (peer, opened), oldest first
        self._by_peer: dict[str, dict[K, float]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: object) -> bool:
        return key in self._all

    def from_peer(self, host: str) -> int:
        return len(self._by_peer.get(host, ()))

    def add(self, key: K, host: str, now: float, identifying: Callable[[K], bool]) -> list[K]:
        """Track a new connection; return the older ones to close so that the limits hold."""
        self._all[key] = (host, now)
        self._by_peer.setdefault(host, {})[key] = now
        return self._make_room(self._by_peer[host], now, identifying) + self.enforce(
            now, identifying
        )

    def enforce(self, now: float, identifying: Callable[[K], bool]) -> list[K]:
        """The connections to close now: past a limit, the oldest that had their grace;
        past the ceiling, the oldest of all. `identifying(k)`: k's call id is waiting in its
        socket; such a connection is never chosen (its next read makes it a call)."""
        victims: list[K] = []
        for peer in list(self._by_peer.values()):
            victims += self._make_room(peer, now, identifying)
        victims += self._make_room(self._all, now, identifying, limit=self.total)
        victims += self._make_room(self._all, now, identifying, self.hard_total, grace=0.0)
        return victims

    def discard(self, key: K) -> None:
        """The connection identified itself or closed: it no longer counts."""
        entry = self._all.pop(key, None)
        if entry is None:
            return
        peer = self._by_peer[entry[0]]
        del peer[key]
        if not peer:
            del self._by_peer[entry[0]]

    def _make_room(
        self,
        scope: dict[K, Any],
        now: float,
        identifying: Callable[[K], bool],
        limit: int | None = None,
        grace: float | None = None,
    ) -> list[K]:
        excess = len(scope) - (self.per_peer if limit is None else limit)
        if excess <= 0:
            return []
        grace = self.grace if grace is None else grace
        chosen: list[K] = []
        for key in scope:  # oldest first; nothing is removed until the choice is made
            if len(chosen) == excess or now - self._all[key][1] < grace:
                break  # the rest are younger still
            if not identifying(key):
                chosen.append(key)
        for key in chosen:
            self.discard(key)
        return chosen


class Candidate(Hashable, Protocol):
    """A connection as admission sees it."""

    host: str

    def refuse(self) -> None: ...

    def call_id_waiting(self) -> bool: ...


C = TypeVar("C", bound=Candidate)


class Admission(Generic[C]):
    """Who is served: allowed peers, pending connections within their limits, MAX_CALLS."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._max_calls = settings.max_calls
        self._metrics = metrics
        self._peers = PeerFilter(settings.allowed_peers)
        self.pending: PendingConnections[C] = PendingConnections(
            settings.max_pending_connections, settings.max_pending_per_peer
        )
        self._refused: dict[str, int] = {}

    def admit(self, conn: C, accepting: bool) -> bool:
        """Whether a new connection is served: then it waits for its call id, and the pending
        connections it pushes past the limits are closed."""
        reason = None
        if not accepting:
            reason = "not_accepting"
        elif not self._peers.allows(conn.host):
            reason = "peer_not_allowed"
        if reason is not None:
            self._refuse(conn.host, reason)
            return False
        now = time.monotonic()
        self._close(self.pending.add(conn, conn.host, now, _call_id_waiting))
        return True

    def identified(self, conn: C, calls_open: int) -> bool:
        """The connection sent its call id: whether its call may open (MAX_CALLS)."""
        self.pending.discard(conn)
        if calls_open >= self._max_calls:
            self._refuse(conn.host, "max_calls")
            return False
        return True

    def closed(self, conn: C) -> None:
        self.pending.discard(conn)

    def sweep(self, now: float) -> None:
        """Once a second: the pending limits, and the summary of refusals."""
        self._close(self.pending.enforce(now, _call_id_waiting))
        if self._refused:
            log.warning("connections_refused", **self._refused)
            self._refused = {}

    def _close(self, victims: list[C]) -> None:
        for victim in victims:
            victim.refuse()
            self._refuse(victim.host, "pending_limit")

    def _refuse(self, host: str, reason: str) -> None:
        self._metrics.connections_refused.labels(reason).inc()
        if not self._refused:
            log.warning("connection_refused", peer=host, reason=reason)
        self._refused[reason] = self._refused.get(reason, 0) + 1


def _call_id_waiting(conn: Candidate) -> bool:
    return conn.call_id_waiting()
