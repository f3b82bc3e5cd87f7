"""A call's Postgres writes in their spool form: what this version writes reads back the same,
and what the previous version spooled (op name and keyword arguments) still replays."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamsrv.records import CallEndedRow, CallStartedRow, ContextRow, JobRow, from_spool, to_spool

AT = datetime(2026, 12, 3, 7, 0, tzinfo=UTC)
WRITES = [
    CallStartedRow("c1", AT, "10.0.0.7:5000", 8000, "hybrid"),
    JobRow("c1", "/var/lib/streamsrv/recordings/2026/12/03/c1.wav", "sw"),
    ContextRow("c1", {"role": "caller", "tags": {"line": "7"}}, "sw"),
    CallEndedRow("c1", AT, 12.5, "12#", "hello there", None, "ended"),
]


@pytest.mark.parametrize("write", WRITES, ids=lambda w: w.OP)
def test_a_spooled_write_reads_back_the_same(write) -> None:
    assert from_spool(to_spool(write)) == write


def test_the_previous_versions_spool_files_replay() -> None:
    spooled = {
        "op": "call_ended",
        "kwargs": {
            "call_id": "c1",
            "ended_at": "2026-12-03T07:00:00+00:00",
            "duration_s": 12.5,
            "dtmf": "12#",
            "live_transcript": "hello there",
            "language": None,
            "status": "ended",
        },
    }
    assert from_spool(spooled) == WRITES[3]
    assert to_spool(WRITES[3]) == spooled
    # a job spooled before jobs carried a language
    old_job = {"op": "enqueue_job", "kwargs": {"call_id": "c1", "audio_path": "/a.wav"}}
    assert from_spool(old_job) == JobRow("c1", "/a.wav", None)


def test_an_unknown_write_is_refused() -> None:
    with pytest.raises(KeyError):
        from_spool({"op": "drop_table", "kwargs": {}})
