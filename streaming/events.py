"""Interaction events: what the serving side reports and the online student learns from.

Two event types share one topic, keyed by request id (see :mod:`streaming.partitioner`):

* :class:`Impression` - one served ranking: the candidates in the order they were shown.
* :class:`Feedback` - one user action on one shown candidate (click, accept, skip).

Events are JSON objects with a ``type`` discriminator and a ``schema_version``.
Readers ignore fields they do not know, so producers can add fields without a
coordinated upgrade; a *new schema version* is rejected instead, because it may
change the meaning of known fields. :func:`parse_event` raises only
:class:`InvalidEvent`, whatever the bytes, so a consumer can route any bad
message to the dead-letter queue instead of crashing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

# Small, fixed set of rejection codes: used as a metrics label, so never free text.
BAD_JSON = "bad_json"
SCHEMA = "schema"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_CANDIDATE = "unknown_candidate"

NonEmpty = Annotated[str, Field(min_length=1)]


class InvalidEvent(ValueError):
    """A message that is not a valid event.

    ``code`` is one of a few stable categories (a metrics label); ``reason`` is a
    human-readable explanation that names the offending field.
    """

    def __init__(self, reason: str, code: str = SCHEMA) -> None:
        self.reason, self.code = reason, code
        super().__init__(reason)


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    request_id: NonEmpty
    event_time: AwareDatetime

    @field_validator("event_time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # One canonical zone: equal instants serialize identically (join state, tests).
        return value.astimezone(UTC)

    def to_bytes(self) -> bytes:
        """UTF-8 JSON, the wire format of both backends."""
        return self.model_dump_json().encode("utf-8")


class Impression(_Event):
    """A ranking served for one request; ``candidate_ids`` in the order shown (rank 1 first)."""

    type: Literal["impression"] = "impression"
    query_id: NonEmpty
    query: NonEmpty
    candidate_ids: list[NonEmpty] = Field(min_length=1)
    model_version: NonEmpty

    @field_validator("candidate_ids")
    @classmethod
    def _unique(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise ValueError(f"candidate ids must be unique, {dup!r} is repeated")
        return ids


class Feedback(_Event):
    """One action on one shown candidate; ``position`` is its 1-based rank in the impression."""

    type: Literal["feedback"] = "feedback"
    candidate_id: NonEmpty
    action: Literal["click", "accept", "skip"]
    position: int = Field(ge=1)
    dwell_ms: float | None = Field(None, ge=0, allow_inf_nan=False)


Event = Impression | Feedback
_ADAPTER: TypeAdapter[Event] = TypeAdapter(
    Annotated[Impression | Feedback, Field(discriminator="type")]
)
_TYPES = ("impression", "feedback")


def _describe(err: ValidationError) -> str:
    """First validation error as ``field 'a.b': message`` (the discriminator level dropped)."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"] if p not in _TYPES]
    field = ".".join(loc) or "event"
    return f"field '{field}': {first['msg']}"


def parse_event(raw: bytes) -> Event:
    """Decode one message; raise :class:`InvalidEvent` (and nothing else) when it is not valid."""
    try:
        data: Any = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as exc:
        raise InvalidEvent(f"not valid UTF-8 JSON: {exc}", BAD_JSON) from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}", BAD_JSON)
    version = data.get("schema_version", 1)
    if type(version) is not int:
        raise InvalidEvent(f"field 'schema_version': expected an integer, got {version!r:.40}")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidEvent(
            f"field 'schema_version': unsupported version {version} "
            f"(this reader supports {sorted(SUPPORTED_SCHEMA_VERSIONS)})",
            UNSUPPORTED_VERSION,
        )
    kind = data.get("type")
    if kind not in _TYPES:
        got = "missing" if kind is None else f"{kind!r:.40}"
        raise InvalidEvent(f"field 'type': must be 'impression' or 'feedback', got {got}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # defensive
        raise InvalidEvent(f"invalid event: {exc}") from None
