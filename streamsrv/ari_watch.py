"""What `streamsrv ari` does with a call, without I/O: which legs, which roles, which context,
and which ARI events start or end the watch of a channel.

A channel that enters the Stasis application (ARI_APP) is watched: it is sent on in the
dialplan at once, and two legs are set up beside it, each a snoop channel (`spy=in`: what the
channel sends, role `caller`; `spy=out`: what it hears, role `agent`) in a mixing bridge with
an externalMedia channel that streams the snooped audio to streamsrv's AudioSocket port as a
call of its own (a fresh UUID). The ids of everything made for a watch are chosen here, before
any request, and start with `<app>-`: so the StasisStart of our own channels is known for what
it is, even when it comes before the reply that created them, and a cleanup knows every id
whether or not its setup got that far.

The agent's number is the watched channel's connected line: known at StasisStart when the
channel was placed to an agent, else given by the ChannelConnectedLine event that Asterisk sends
when the call is answered (a Dial or a Queue member), and then posted to both legs' context.

A run that was killed leaves its legs behind. The next run, once connected, sorts what carries
our prefix and no watch of its own holds (sort_leftovers): a watched channel still up whose two
legs are whole (each bridge holding its snoop and its externalMedia channel) is adopted and
watched on, so its transcription goes on; anything else is removed.

A watch ends at the first of: the watched channel hanging up, or any of its snoop or
externalMedia channels ending (the snoops end with the channel they hear; an externalMedia
channel ends when streamsrv closes its socket).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamsrv.config import Settings

SPIES = (("in", "caller"), ("out", "agent"))  # snoop direction -> role of that leg
ENDING = ("StasisEnd", "ChannelDestroyed", "ChannelHangupRequest")
PARTS = ("bridge", "snoop", "media")


@dataclass(frozen=True)
class WatchConfig:
    app: str
    audiosocket_address: str  # host:port of streamsrv's AudioSocket, as Asterisk reaches it
    streamsrv_url: str  # streamsrv's HTTP, as `streamsrv ari` reaches it
    language_variable: str
    queue_variable: str
    token: str  # HTTP_TOKEN: the bearer token of context posts, "" for none

    @classmethod
    def from_settings(cls, settings: Settings) -> WatchConfig:
        return cls(
            app=settings.ari_app,
            audiosocket_address=settings.ari_audiosocket_address
            or f"{_reachable(settings.audiosocket_host)}:{settings.audiosocket_port}",
            streamsrv_url=(
                settings.ari_streamsrv_url
                or f"http://{_reachable(settings.http_host)}:{settings.http_port}"
            ).rstrip("/"),
            language_variable=settings.ari_language_variable,
            queue_variable=settings.ari_queue_variable,
            token=settings.http_token,
        )


def _reachable(host: str) -> str:
    """A listening address as a client dials it: a wildcard means this host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "[::1]"
    return f"[{host}]" if address.version == 6 else host


@dataclass(frozen=True)
class Leg:
    """One direction of a watched channel and the ids of what carries it to streamsrv."""

    spy: str  # in, out
    role: str
    call_id: str  # the AudioSocket call id streamsrv knows the leg by
    bridge_id: str
    snoop_id: str
    media_id: str


@dataclass(frozen=True)
class Channel:
    """What the watch needs to know of the watched channel (from its StasisStart)."""

    id: str
    name: str
    caller_number: str | None
    connected_number: str | None = None  # the other party: the agent, once answered

    @classmethod
    def from_event(cls, channel: dict[str, Any]) -> Channel:
        return cls(
            str(channel["id"]),
            str(channel.get("name", "")),
            _number(channel, "caller"),
            _number(channel, "connected"),
        )


def _number(channel: dict[str, Any], which: str) -> str | None:
    """A CallerID's number from an ARI Channel (`caller` or `connected`), None when empty."""
    party = channel.get(which)
    number = party.get("number") if isinstance(party, dict) else None
    return str(number) if number else None


def plan_legs(app: str, channel_id: str, new_uuid: Callable[[], uuid.UUID]) -> tuple[Leg, ...]:
    return tuple(make_leg(app, spy, str(new_uuid())) for spy, _ in SPIES)


def make_leg(app: str, spy: str, call_id: str) -> Leg:
    """A leg's ids: all of them follow from the app, the direction and the call id."""
    stem = f"{app}-{spy}-{call_id}"
    role = dict(SPIES)[spy]
    return Leg(spy, role, call_id, f"{stem}-bridge", f"{stem}-snoop", f"{stem}-media")


def leg_of(app: str, own_id: str) -> Leg | None:
    """The leg an id made by make_leg belongs to; None for any other id."""
    stem, _, part = own_id.rpartition("-")
    spy, _, call_id = stem.removeprefix(f"{app}-").partition("-")
    if not stem.startswith(f"{app}-") or spy not in dict(SPIES) or part not in PARTS:
        return None
    try:
        if str(uuid.UUID(call_id)) != call_id:
            return None
    except ValueError:
        return None
    return make_leg(app, spy, call_id)


def snooped(channel: dict[str, Any]) -> str | None:
    """The channel a snoop channel hears, from its name (`Snoop/<uniqueid>-<sequence>`)."""
    name = str(channel.get("name", ""))
    if not name.startswith("Snoop/"):
        return None
    return name.removeprefix("Snoop/").rpartition("-")[0] or None


def _ids(leg: Leg) -> tuple[str, str, str]:
    return (leg.bridge_id, leg.snoop_id, leg.media_id)


@dataclass(frozen=True)
class Leftovers:
    """What an earlier run left in Asterisk: watches to take over, and what to remove."""

    adopt: dict[str, tuple[Leg, ...]]  # watched channel id -> its two legs, whole
    channels: list[str]  # to hang up
    bridges: list[str]  # to destroy


def sort_leftovers(
    app: str, channels: list[dict[str, Any]], bridges: list[dict[str, Any]], known: set[str]
) -> Leftovers:
    """Sort the ids of ours (by their prefix) that no watch in `known` holds."""
    up = {str(c.get("id")) for c in channels}
    members = {str(b.get("id")): set(map(str, b.get("channels") or [])) for b in bridges}
    own_channels = {i for i in up if leg_of(app, i) is not None and i not in known}
    own_bridges = {i for i in members if leg_of(app, i) is not None and i not in known}
    hears: dict[str, set[Leg]] = {}  # watched channel id -> legs whose snoop hears it
    for channel in channels:
        channel_id, watched = str(channel.get("id")), snooped(channel)
        leg = leg_of(app, channel_id)
        if (
            leg is not None
            and watched
            and channel_id == leg.snoop_id
            and channel_id in own_channels
        ):
            hears.setdefault(watched, set()).add(leg)
    adopt: dict[str, tuple[Leg, ...]] = {}
    for watched, legs in hears.items():
        whole = {
            leg.spy: leg
            for leg in legs
            if {leg.snoop_id, leg.media_id} <= members.get(leg.bridge_id, set()) & up
        }
        if watched in up and len(whole) == len(SPIES):
            adopt[watched] = tuple(whole[spy] for spy, _ in SPIES)
    kept = {i for legs in adopt.values() for leg in legs for i in _ids(leg)}
    return Leftovers(
        adopt,
        sorted(i for i in own_channels if i not in kept),
        sorted(i for i in own_bridges if i not in kept),
    )


@dataclass(frozen=True)
class Variables:
    """What the watch reads from the channel's variables when it sets the legs up."""

    linkedid: str | None  # CHANNEL(linkedid): the conversation
    language: str | None = None  # ARI_LANGUAGE_VARIABLE
    queue: str | None = None  # ARI_QUEUE_VARIABLE


def leg_context(leg: Leg, channel: Channel, variables: Variables) -> dict[str, Any]:
    """The JSON body of POST /calls/<leg.call_id>/context (streamsrv.context)."""
    context: dict[str, Any] = {"role": leg.role}
    if variables.language:
        context["language"] = variables.language.strip().lower()
    if variables.linkedid:
        context["conversation"] = variables.linkedid
    if channel.caller_number:
        context["caller"] = channel.caller_number
    if channel.connected_number:
        context["agent"] = channel.connected_number
    if variables.queue:
        context["queue"] = variables.queue.strip()
    context["tags"] = {"channel": channel.name, "uniqueid": channel.id, "spy": leg.spy}
    return context


@dataclass(frozen=True)
class Watch:
    """Start watching this channel: continue it, then set up its legs."""

    channel: Channel
    legs: tuple[Leg, ...]


@dataclass(frozen=True)
class Continue:
    """A channel already watched entered Stasis again: only send it on."""

    channel_id: str


@dataclass(frozen=True)
class Entered:
    """One of our snoop or externalMedia channels is in the app: it may join its bridge now
    (a channel is in Stasis only once its StasisStart is out, not when its creation returns)."""

    channel_id: str


@dataclass(frozen=True)
class Unwatch:
    """Tear down what a watch made (the watched channel itself is never touched)."""

    channel_id: str
    legs: tuple[Leg, ...]
    why: str


@dataclass(frozen=True)
class Connected:
    """The watched channel's connected line changed: the agent it now talks to."""

    channel_id: str
    legs: tuple[Leg, ...]
    agent: str


Decision = Watch | Continue | Entered | Connected | Unwatch


@dataclass
class Watches:
    """The watched channels and the ids of what was made for them; events in, decisions out."""

    app: str
    new_uuid: Callable[[], uuid.UUID] = uuid.uuid4
    _legs: dict[str, tuple[Leg, ...]] = field(default_factory=dict)  # watched id -> legs
    _owner: dict[str, str] = field(default_factory=dict)  # our channel id -> watched id

    def __len__(self) -> int:
        return len(self._legs)

    def watched(self) -> list[str]:
        return list(self._legs)

    def known(self) -> set[str]:
        """The ids of everything the watches made or are making."""
        return {i for legs in self._legs.values() for leg in legs for i in _ids(leg)}

    def adopt(self, channel_id: str, legs: tuple[Leg, ...]) -> bool:
        """Watch on what an earlier run set up (see sort_leftovers); False if watched already."""
        if channel_id in self._legs:
            return False
        self._legs[channel_id] = legs
        for leg in legs:
            self._owner[leg.snoop_id] = self._owner[leg.media_id] = channel_id
        return True

    def is_own(self, channel_id: str) -> bool:
        return channel_id.startswith(f"{self.app}-")

    def on_event(self, event: dict[str, Any]) -> Decision | None:
        kind = event.get("type")
        channel = event.get("channel")
        if not isinstance(channel, dict) or "id" not in channel:
            return None
        channel_id = str(channel["id"])
        if kind == "StasisStart":
            if event.get("application", self.app) != self.app:
                return None
            if self.is_own(channel_id):
                return Entered(channel_id) if channel_id in self._owner else None
            if channel_id in self._legs:
                return Continue(channel_id)
            legs = plan_legs(self.app, channel_id, self.new_uuid)
            self._legs[channel_id] = legs
            for leg in legs:
                self._owner[leg.snoop_id] = self._owner[leg.media_id] = channel_id
            return Watch(Channel.from_event(channel), legs)
        if kind == "ChannelConnectedLine" and channel_id in self._legs:
            agent = _number(channel, "connected")
            return Connected(channel_id, self._legs[channel_id], agent) if agent else None
        if kind in ENDING:
            if channel_id in self._owner:
                return self.forget(self._owner[channel_id], f"{kind} of {channel_id}")
            if channel_id in self._legs and kind != "StasisEnd":  # StasisEnd: we sent it on
                return self.forget(channel_id, f"{kind} of the watched channel")
        return None

    def forget(self, channel_id: str, why: str) -> Unwatch | None:
        """End a watch (at most once): what is to be torn down, or None if not watched."""
        legs = self._legs.pop(channel_id, None)
        if legs is None:
            return None
        for leg in legs:
            self._owner.pop(leg.snoop_id, None)
            self._owner.pop(leg.media_id, None)
        return Unwatch(channel_id, legs, why)
