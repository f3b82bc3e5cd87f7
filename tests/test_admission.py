"""Admission without sockets: which pending connection makes room when a limit is passed."""

from __future__ import annotations

from streamsrv import audiosocket as aso
from streamsrv.admission import PendingConnections

LATER = 10.0  # past every connection's grace


def never(_: int) -> bool:
    return False


def test_a_peer_past_its_limit_loses_its_oldest_pending_connection() -> None:
    pending: PendingConnections[int] = PendingConnections(total=100, per_peer=3)
    assert [pending.add(n, "10.0.0.1", 0.0, never) for n in range(3)] == [[], [], []]
    assert pending.add(3, "10.0.0.1", LATER, never) == [0]
    assert pending.add(4, "10.0.0.2", LATER, never) == []  # another address has its own room
    assert pending.from_peer("10.0.0.1") == 3 and len(pending) == 4
    assert 0 not in pending and 3 in pending


def test_the_total_limit_takes_the_oldest_of_any_peer() -> None:
    pending: PendingConnections[int] = PendingConnections(total=3, per_peer=10)
    for n, host in enumerate(["a", "b", "c"]):
        assert pending.add(n, host, 0.0, never) == []
    assert pending.add(3, "c", LATER, never) == [0]
    assert pending.from_peer("a") == 0 and len(pending) == 3


def test_every_connection_gets_its_grace_then_the_limits_hold() -> None:
    """A flood inside one second passes the limit (a real call's id may still be on its way);
    once they are a second old, the oldest are closed down to the limit."""
    pending: PendingConnections[int] = PendingConnections(total=100, per_peer=2, grace=1.0)
    for n in range(10):
        assert pending.add(n, "pbx", n * 0.05, never) == []
    assert pending.enforce(1.2, never) == [0, 1, 2, 3, 4]  # aged 1.2 to 1.0 s; 5-9 are younger
    assert pending.enforce(2.0, never) == [5, 6, 7]
    assert pending.from_peer("pbx") == 2


def test_past_the_ceiling_the_grace_gives_way() -> None:
    pending: PendingConnections[int] = PendingConnections(total=2, per_peer=100, ceiling=2)
    for n in range(4):
        assert pending.add(n, str(n), 0.0, never) == []
    assert pending.add(4, "4", 0.0, never) == [0]  # 5 > 2 * 2 even within the grace
    assert len(pending) == 4


def test_a_connection_whose_call_id_is_waiting_is_never_chosen() -> None:
    pending: PendingConnections[int] = PendingConnections(total=100, per_peer=2)
    waiting = {0}
    pending.add(0, "pbx", 0.0, waiting.__contains__)
    pending.add(1, "pbx", 0.0, waiting.__contains__)
    assert pending.add(2, "pbx", LATER, waiting.__contains__) == [1]  # 0 is about to identify
    # every older one is identifying: nobody is closed, the limit is passed for a moment
    assert pending.add(3, "pbx", LATER, lambda n: n != 3) == []
    assert pending.from_peer("pbx") == 3


def test_identified_or_closed_connections_free_their_place() -> None:
    pending: PendingConnections[int] = PendingConnections(total=2, per_peer=2)
    pending.add(0, "pbx", 0.0, never)
    pending.add(1, "pbx", 0.0, never)
    pending.discard(0)
    pending.discard(0)  # twice is harmless
    assert pending.add(2, "pbx", LATER, never) == []
    pending.discard(1)
    pending.discard(2)
    assert len(pending) == 0 and pending.from_peer("pbx") == 0


def test_only_a_whole_well_formed_call_id_counts_as_waiting() -> None:
    message = aso.encode(aso.CallId("0b5cfa4e-7b7e-4c4b-9a5c-5d0d2a1f6a11"))
    assert aso.starts_with_call_id(message)
    assert aso.starts_with_call_id(message + b"\x10\x01\x40")  # audio behind it
    assert not aso.starts_with_call_id(message[:-1])  # the header alone, or part of the id
    assert not aso.starts_with_call_id(b"\x01\xff\xff" + bytes(16))  # a length of 65535
    assert not aso.starts_with_call_id(b"\x10\x00\x10" + bytes(16))  # audio first
