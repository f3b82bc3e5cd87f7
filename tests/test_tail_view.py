"""What `streamsrv tail` prints: the renderer fed messages as published, text read back."""

from __future__ import annotations

from typing import Any

import pytest

from streamsrv import events
from streamsrv.tail_view import ALERT, ERASE, RESET, TailView, clip_left, clock, columns

A = "0a1b2c3d-0000-4000-8000-000000000001"
B = "9f8e7d6c-0000-4000-8000-000000000002"
T0 = 1_700_000_000.0


class Call:
    """A call's messages, numbered and timed as a call publishes them."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.seq = 0

    def message(self, event: events.Event, at: float = 0.0) -> dict[str, Any]:
        self.seq += 1
        return events.encode(event, self.seq, T0 + at)

    def started(self, context: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.message(
            events.CallStarted(
                call_id=self.call_id, started_at=T0, peer="10.0.0.5:4000", sample_rate=8000,
                processing_mode="hybrid", context=context,
            )
        )  # fmt: skip

    def partial(self, segment: int, text: str, start: float = 1.0) -> dict[str, Any]:
        return self.message(
            events.Partial(
                call_id=self.call_id, segment=segment, text=text, start=start, end=start + 1,
                audio_end=start + 1,
            ),
            start + 1,
        )  # fmt: skip

    def final(
        self, segment: int, text: str, start: float = 1.0, language: str | None = None
    ) -> dict[str, Any]:
        return self.message(
            events.Final(
                call_id=self.call_id,
                segment=segment,
                text=text,
                start=start,
                end=start + 1,
                language=language,
            ),
            start + 1.5,
        )

    def ended(self, duration: float = 83.0) -> dict[str, Any]:
        return self.message(
            events.CallEnded(
                call_id=self.call_id, ended_at=T0 + duration, duration=duration,
                audio_seconds=duration, reason="hangup", segments=2, job_id=7,
                processing_mode="hybrid",
            ),
            duration,
        )  # fmt: skip

    def alert(self, text: str, source: str = "final") -> dict[str, Any]:
        """As the alerts feature publishes it (a type this renderer reads from its fields)."""
        self.seq += 1
        return {
            "type": "alert", "call_id": self.call_id, "seq": self.seq, "emitted_at": T0 + 9,
            "phrase": "cancel my account", "label": "churn", "language": "en", "segment": 3,
            "text": text, "source": source, "start": 7.2, "end": 8.0,
        }  # fmt: skip


def rendered(view: TailView, *messages: dict[str, Any]) -> str:
    return "".join(view.render(m) for m in messages)


def test_on_a_terminal_the_partial_is_redrawn_in_place_then_replaced_by_its_final() -> None:
    view = TailView(terminal=True, color=False, width=120)
    a = Call(A)
    assert view.render(a.started({"role": "caller", "language": "en"})) == (
        "0:00 caller/en  call started from 10.0.0.5:4000\n"
    )
    assert view.render(a.partial(0, "hello")) == ERASE + "0:01 caller/en  hello"
    assert view.render(a.partial(0, "hello there")) == ERASE + "0:01 caller/en  hello there"
    assert view.render(a.final(0, "Hello there.", language="en")) == (
        ERASE + "0:01 caller/en  Hello there.\n"
    )
    assert view.clear() == ""  # nothing left on the last line
    assert view.render(a.partial(1, "bye", start=64.0)) == ERASE + "1:04 caller/en  bye"
    ended = "1:23 caller/en  call ended: hangup, 1:23, 2 segments, post-call job 7\n"
    assert view.render(a.ended()) == ERASE + ended
    assert view.clear() == ""


def test_a_line_printed_while_a_partial_is_drawn_takes_its_place_and_the_partial_comes_back() -> (
    None
):
    view = TailView(terminal=True, color=False, show_call=True, width=120)
    a, b = Call(A), Call(B)
    rendered(view, a.started(), b.started({"role": "agent"}))
    assert view.render(a.partial(0, "one moment")) == ERASE + "0:01 0a1b2c3d  one moment"
    assert view.render(b.final(0, "Good morning.", language="en")) == (
        ERASE + "0:01 9f8e7d6c agent/en  Good morning.\n" + ERASE + "0:01 0a1b2c3d  one moment"
    )
    assert view.clear() == ERASE  # before a warning on stderr, say
    assert view.render(b.message(events.Dtmf(call_id=B, digit="5", at=4.5))) == (
        "0:04 9f8e7d6c agent/en  DTMF 5\n" + ERASE + "0:01 0a1b2c3d  one moment"
    )


def test_two_calls_speaking_at_once_each_final_leaves_the_other_partial_drawn() -> None:
    view = TailView(terminal=True, color=False, show_call=True, width=120)
    a, b = Call(A), Call(B)
    rendered(view, a.partial(0, "first"), b.partial(0, "second"))
    out = view.render(b.final(0, "Second."))
    assert out.endswith(ERASE + "0:01 0a1b2c3d  first")  # a's partial, drawn again
    out = view.render(a.final(0, "First."))
    assert out == ERASE + "0:01 0a1b2c3d  First.\n"


def test_a_late_partial_of_a_segment_already_final_is_not_drawn() -> None:
    view = TailView(terminal=True, color=False)
    a = Call(A)
    rendered(view, a.partial(0, "hel"), a.final(0, "Hello."))
    assert view.render(a.partial(0, "hello")) == ""


def test_an_empty_final_erases_its_partial_and_prints_nothing() -> None:
    view = TailView(terminal=True, color=False)
    a = Call(A)
    view.render(a.partial(0, "hm"))
    assert view.render(a.final(0, " ")) == ERASE


def test_a_long_partial_is_clipped_to_the_terminal_keeping_its_latest_words() -> None:
    view = TailView(terminal=True, color=False, width=30)
    a = Call(A)
    out = view.render(a.partial(0, "one two three four five six seven eight"))
    line = out.removeprefix(ERASE)
    assert line == "0:01  …r five six seven eight"
    assert columns(line) == 29  # never the full width: the cursor stays on the line
    assert columns(clip_left("0:01  ", "日本語のテキストです", 12)) <= 12


def test_not_on_a_terminal_lines_are_plain_and_partials_are_skipped() -> None:
    a = Call(A)
    messages = [
        a.started({"role": "caller", "caller": "+254700000000"}),
        a.partial(0, "hello"),
        a.final(0, "Hello.", language="sw"),
        a.alert("please cancel my account"),
        a.ended(),
    ]
    out = rendered(TailView(terminal=False), *messages)
    assert "\033" not in out and "\r" not in out
    assert out.splitlines() == [
        "0:00 caller  call started from 10.0.0.5:4000, caller +254700000000",
        "0:01 caller/sw  Hello.",
        "0:07 caller/sw  ALERT churn (cancel my account): please cancel my account",
        "1:23 caller/sw  call ended: hangup, 1:23, 2 segments, post-call job 7",
    ]
    with_partials = rendered(TailView(terminal=False, partials=True), *messages)
    assert "0:01 caller  … hello\n" in with_partials and "\033" not in with_partials


def test_an_alert_is_highlighted_on_a_terminal() -> None:
    view = TailView(terminal=True, color=True, width=200)
    a = Call(A)
    out = view.render(a.alert("cancel my account now", source="partial"))
    assert out == (
        f"{ALERT}0:07  ALERT churn (cancel my account) (in a partial): cancel my account now"
        f"{RESET}\n"
    )


def test_context_and_language_fill_the_head_of_later_lines() -> None:
    view = TailView(terminal=False)
    a = Call(A)
    out = rendered(
        view,
        a.started(),
        a.message(events.CallContext(call_id=A, context={"role": "agent", "tags": {"q": "x"}}), 2),
        a.message(events.LanguageDetected(call_id=A, language="sw", probability=0.93, at=3.2), 4),
        a.final(0, "Habari.", start=3.0),
    )
    assert out.splitlines() == [
        "0:00  call started from 10.0.0.5:4000",
        "0:02 agent  context: role agent, tags q=x",
        "0:03 agent/sw  language sw (93%)",
        "0:03 agent/sw  Habari.",
    ]


def test_what_callers_or_context_posters_send_cannot_drive_the_terminal() -> None:
    view = TailView(terminal=True, color=False, width=200)
    a = Call(A)
    out = rendered(
        view,
        a.started({"caller": "\033]0;pwned\007x", "role": "ag\033[2Jent"}),
        a.final(0, "line\rover\nwrite\u202e"),
    )
    assert "\033]" not in out and "\033[2J" not in out and "\007" not in out and "\u202e" not in out
    assert out.count("\n") == 2 and out.count("\r") == 0


def test_post_call_results_of_every_call_are_one_line_each() -> None:
    view = TailView(terminal=False, show_call=True)
    done = events.PostcallDone(
        call_id=A, job_id=7, language="sw", model="large-v3", cached=False, role="caller"
    )
    failed = events.PostcallFailed(call_id=B, job_id=8, attempts=3, error="audio missing")
    assert rendered(view, events.encode(done), events.encode(failed)).splitlines() == [
        "-:-- 0a1b2c3d  post-call done (large-v3, sw)",
        "-:-- 9f8e7d6c  post-call failed after 3 attempts: audio missing",
    ]


def test_messages_of_unknown_types_print_nothing() -> None:
    view = TailView(terminal=False)
    assert view.render({"type": "something_new", "call_id": A, "seq": 1}) == ""
    assert view.render({"type": "final", "call_id": A}) == ""  # not a whole message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (9.99, "0:09"), (83, "1:23"), (3723, "1:02:03"), (None, "-:--")],
)
def test_clock(seconds: float | None, text: str) -> None:
    assert clock(seconds) == text
