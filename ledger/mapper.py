"""Event state as JSON, decoded straight into the types the event classes declare.

The library's JSONTranscoder walks every decoded object through a Python hook to find its
tagged Decimals, dates and datetimes: about 40 µs an event, most of a rebuild's time. Every
event whose fields all have concrete types (no `Any`) is instead encoded and decoded by msgspec
against a TypedDict built from the event class's own annotations: one C call each way.
Events with free-form fields (the library's own snapshot's state, an idempotent response, an
import summary) keep the library's tagged JSON (a customer's snapshot declares its state's
types: `ledger.domain.Customer.Snapshot`), which round-trips any value it has a transcoding for. A stored
state in the tagged format (events written before this mapper among them) goes to the library;
a plain one that does not match its class's types is an error, never a state of strings.

A class's `class_version` and `upcast_vN_vN+1` methods work as they do in the library: a plain
state records the version it was written at (from 2 up), and an older one is upcast after
decoding. It decodes against the class's current fields, so an upcast can add a field (or fill
one that became optional), not change a field's type.
"""

from __future__ import annotations

import typing
from collections.abc import Hashable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypedDict

import msgspec
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, MapperDeserialisationError, StoredEvent, find_id_convertor
from eventsourcing.utils import get_topic, resolve_topic

# Fields the stored event carries in its own columns, not in its state.
_OUTSIDE_STATE = ("originator_id", "originator_version")

_encoder = msgspec.json.Encoder(decimal_format="string")
# Every state the library's JSON transcoder wrote has this key (its timestamp at least is tagged);
# in JSON an unescaped quote before it can only open a key, never sit inside a string value.
_TAGGED = b'"_type_":'


def _is_concrete(annotation: Any) -> bool:
    if annotation is Any:
        return False
    return all(_is_concrete(arg) for arg in typing.get_args(annotation))


@dataclass(frozen=True)
class _StateType:
    fields: frozenset[str]
    decoder: msgspec.json.Decoder[Any]
    version: int  # the class's class_version


@cache
def _state_type(cls: type) -> _StateType | None:
    """How `cls`'s state decodes, or None when it must keep the library's tagged JSON."""
    fields: dict[str, Any] = {}
    for name, annotation in typing.get_type_hints(cls).items():
        if name in _OUTSIDE_STATE or typing.get_origin(annotation) is ClassVar:
            continue
        if not _is_concrete(annotation):
            return None
        fields[name] = annotation
    state = TypedDict(f"{cls.__qualname__}State", {**fields, "class_version": int}, total=False)  # type: ignore[misc]
    return _StateType(frozenset(fields), msgspec.json.Decoder(state), getattr(cls, "class_version", 1))


class TypedMapper(Mapper[Any]):
    """A `Mapper` that decodes each event's state by its class's annotations where it can."""

    def to_stored_event(self, domain_event: DomainEventProtocol[Any]) -> StoredEvent:
        state_type = _state_type(type(domain_event))
        state = dict(vars(domain_event))
        if (
            state_type is None
            or self.cipher
            or self.compressor
            or not state_type.fields.issuperset(state.keys() - set(_OUTSIDE_STATE))
        ):
            return super().to_stored_event(domain_event)
        originator_id = state.pop("originator_id")
        originator_version = state.pop("originator_version")
        if state_type.version > 1:
            state["class_version"] = state_type.version
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=get_topic(type(domain_event)),
            state=_encoder.encode(state),
        )

    def plain_json(self, state: bytes) -> bool:
        """Whether a stored state is this mapper's plain JSON (each field as its class declares it),
        not the library's tagged JSON, nor ciphered or compressed."""
        return not (self.cipher or self.compressor) and _TAGGED not in state

    def typed_json(self, cls: type, state: bytes) -> bool:
        """Whether `to_domain_event` would decode `state` as `cls`'s typed JSON: plain JSON, and a
        class whose fields all have concrete types and that has never been upcast (class_version 1)."""
        state_type = _state_type(cls)
        return self.plain_json(state) and state_type is not None and state_type.version == 1

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        if not self.plain_json(stored_event.state):
            return super().to_domain_event(stored_event)
        cls = resolve_topic(stored_event.topic)
        state_type = _state_type(cls)
        try:
            if state_type is None:
                raise ValueError(
                    f"{cls.__qualname__} now has free-form fields, and its stored events are plain JSON: "
                    "teach ledger/mapper.py to read them"
                )
            state = state_type.decoder.decode(stored_event.state)
            written_at = state.pop("class_version", 1)
            for version in range(written_at, state_type.version):
                getattr(cls, f"upcast_v{version}_v{version + 1}")(state)
        except (ValueError, msgspec.ValidationError) as error:
            # Never hand on a state the library would read as strings: say which event is unreadable.
            raise MapperDeserialisationError(
                f"event {stored_event.originator_id} v{stored_event.originator_version} ({stored_event.topic}): {error}"
            ) from error
        id_type = typing.cast(Hashable, type(stored_event.originator_id))
        state["originator_id"] = find_id_convertor(cls, id_type)(stored_event.originator_id)
        state["originator_version"] = stored_event.originator_version
        domain_event = object.__new__(cls)
        object.__setattr__(domain_event, "__dict__", state)
        return typing.cast(DomainEventProtocol[Any], domain_event)
