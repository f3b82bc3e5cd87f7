"""A call's Postgres writes in their spool form: what this version writes reads back the same,
and what the previous version spooled (op name and keyword arguments) still replays."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamsrv.records import (
    CallEndedRow,
    CallFinishedRow,
    CallStartedRow,
    ContextRow,
    JobRow,
    from_spool,
    to_spool,
)

AT = datetime(2026, 12, 3, 7, 0, tzinfo=UTC)
WRITES = [
    CallStartedRow("c1", AT, "10.0.0.7:5000", 8000, "hybrid"),
    JobRow("c1", "/var/lib/streamsrv/recordings/2026/12/03/c1.wav", "sw"),
    ContextRow("c1", {"role": "caller", "tags": {"line": "7"}}, "sw"),
    CallEndedRow("c1", AT, 12.5, "12#", "hello there", None, "ended"),
]
WRITES += [
    CallFinishedRow(WRITES[3], WRITES[1]),  # type: ignore[arg-type]
    CallFinishedRow(WRITES[3], None),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("write", WRITES, ids=lambda w: f"{w.OP}-{WRITES.index(w)}")
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


async def test_a_call_ends_with_its_job_in_one_write_once(database_url) -> None:
    """The end row and the job in one statement: the row made if the start never landed, the
    job queued once (a replay gives the same id), and no job when none is asked for."""
    from streamsrv.config import Settings
    from streamsrv.jobs import JobStore

    store = JobStore(Settings(database_url=database_url))
    await store.start()
    try:
        ended = CallEndedRow(
            "7b1d5a4e-0f4e-4c36-9a53-5f4f2f3c2b10", AT, 3.0, "", "hi", "en", "ended"
        )
        job = JobRow(ended.call_id, "/r/x.wav", "sw")
        first = await CallFinishedRow(ended, job).apply(store)
        again = await CallFinishedRow(ended, job).apply(store)
        view = await store.calls.view(ended.call_id)
        lone = CallEndedRow("0b9e7c55-3c1c-4d7e-8f67-0d5e0e3b8a21", AT, 1.0, "", "", None, "ended")
        without = await CallFinishedRow(lone, None).apply(store)
        lone_view = await store.calls.view(lone.call_id)
        old = CallEndedRow("5d0f3c1e-8a7b-4c2d-9e6f-1a2b3c4d5e6f", AT, 2.0, "9", "", None, "ended")
        await old.apply(store)  # an end row spooled by the previous version
        old_view = await store.calls.view(old.call_id)
    finally:
        await store.close()
    assert first is not None and again == first
    assert view is not None and view["live_transcript"] == "hi" and view["status"] == "ended"
    assert view["job"]["audio_path"] == "/r/x.wav" and view["job"]["language"] == "sw"
    assert without is None and lone_view is not None and lone_view["job"] is None
    assert old_view is not None and old_view["dtmf"] == "9" and old_view["job"] is None
