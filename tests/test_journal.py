"""The journal of open calls on a real disk: what it holds across a restart, group commit,
a torn last line, compaction, and the one-file-per-call journals of earlier versions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from streamsrv import journal as journal_module
from streamsrv.journal import Journal, read_journal


def info(n: int) -> dict[str, object]:
    return {"created_at": "2026-12-03T00:00:00+00:00", "peer": f"127.0.0.1:{n}", "n": n}


async def started(directory: Path) -> Journal:
    journal = Journal(directory)
    await asyncio.to_thread(journal.start)
    return journal


async def test_open_calls_survive_a_restart_and_closed_ones_do_not(tmp_path: Path) -> None:
    journal = await started(tmp_path)
    await asyncio.gather(*(journal.opened(f"c{n}", info(n)) for n in range(5)))
    await asyncio.gather(journal.closed("c1"), journal.closed("c3"))
    # durable once awaited: a reader sees it without the writer being closed
    assert list(read_journal(tmp_path / "journal")) == ["c0", "c2", "c4"]
    await journal.close()

    again = await started(tmp_path)
    entries = again.entries()
    assert [e["call_id"] for e in entries] == ["c0", "c2", "c4"]
    assert entries[1] == {**info(2), "call_id": "c2"}
    # the restart rewrote the file with only what is open
    assert len((tmp_path / "journal").read_bytes().splitlines()) == 3
    await again.close()


async def test_calls_that_start_together_share_fsyncs(tmp_path: Path, monkeypatch) -> None:
    fsyncs = 0
    real = journal_module.os.fsync

    def counting(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real(fd)

    journal = await started(tmp_path)
    monkeypatch.setattr(journal_module.os, "fsync", counting)
    await asyncio.gather(*(journal.opened(f"c{n}", info(n)) for n in range(200)))
    await journal.close()
    assert len(read_journal(tmp_path / "journal")) == 200
    assert fsyncs < 50, fsyncs  # one per batch, not one per call


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    whole = json.dumps({"open": {"call_id": "a"}}) + "\n"
    path.write_text(whole + whole.replace('"a"', '"b"')[:-9])
    assert list(read_journal(path)) == ["a"]


async def test_the_file_is_compacted_when_mostly_closed_calls(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER", 20)
    journal = await started(tmp_path)
    await journal.opened("kept", info(0))
    for n in range(30):
        await journal.opened(f"c{n}", info(n))
        await journal.closed(f"c{n}")
    await journal.close()
    lines = (tmp_path / "journal").read_bytes().splitlines()
    assert len(lines) < 20
    assert list(read_journal(tmp_path / "journal")) == ["kept"]


async def test_journals_of_earlier_versions_are_recovered_and_struck_out(tmp_path: Path) -> None:
    legacy = tmp_path / "open"
    legacy.mkdir()
    (legacy / "old.json").write_text(json.dumps({"call_id": "old", **info(1)}))
    (legacy / "broken.json").write_text("{")
    journal = await started(tmp_path)
    assert [e["call_id"] for e in journal.entries()] == ["old"]
    await journal.closed("old")
    assert not (legacy / "old.json").exists()
    assert journal.entries() == []
    await journal.close()


async def test_a_closed_journal_refuses_records(tmp_path: Path) -> None:
    journal = await started(tmp_path)
    await journal.close()
    with pytest.raises(RuntimeError):
        await journal.opened("late", info(0))
