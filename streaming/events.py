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

Schema versions
---------------
Version 2 adds three optional impression fields (a v2 impression without them is
valid) and one optional feedback field, ``unknown_candidate``. Rolled out *readers first*: every reader
accepts 1 and 2, writers keep emitting 1 by default, and a producer switches to 2
(:meth:`Impression.v2`) only once every consumer runs this code.

* ``unknown_candidate_ids`` - shown ids the server ranked with a fallback encoder
  because the store had no teacher vector for them yet; unique, a subset of
  ``candidate_ids``. The candidate-store check of :mod:`streaming.dlq` exempts
  them: the producer declared them unknown, so they are not a bad message.
* ``propensities`` - per shown item, the logged probability that it was shown at
  its position (in (0, 1], finite), for off-policy estimators.
* ``teams`` - per shown item, an interleaving team label (1-32 characters, e.g.
  "A"/"B" of team-draft interleaving) or None where no team contributed it.
* feedback ``unknown_candidate`` - True when the impression declared the candidate
  unknown; the store check exempts it too (a click on a new candidate is real).
* feedback ``propensity`` - the examination probability the click model (or a
  propensity estimate) gave this position, in (0, 1]; an IPW learner divides by it
  instead of assuming ``(1 / rank) ** eta``.

Lists given per shown item have one entry per ``candidate_ids`` entry. A bad v2
field is an :class:`InvalidEvent` with code ``schema`` and a reason naming the
field. A *v1* message that carries these fields keeps its v1 meaning: v1 readers
always ignored unknown fields, so :func:`parse_event` drops them. Constructing a
v1 impression *in code* with them set is a writer bug and raises, and a v1
impression serializes without them, byte for byte as before version 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})
# Impression fields that exist from schema version 2 on (dropped from v1 messages).
V2_IMPRESSION_FIELDS = ("unknown_candidate_ids", "propensities", "teams")
V2_FEEDBACK_FIELDS = ("unknown_candidate", "propensity")
MAX_TEAM_LENGTH = 32

# Small, fixed set of rejection codes: used as a metrics label, so never free text.
BAD_JSON = "bad_json"
SCHEMA = "schema"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_CANDIDATE = "unknown_candidate"

NonEmpty = Annotated[str, Field(min_length=1)]
Propensity = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Team = Annotated[str, Field(min_length=1, max_length=MAX_TEAM_LENGTH)]


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

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, version: int) -> int:
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported version {version} "
                             f"(supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)})")
        return version

    @field_validator("event_time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # One canonical zone: equal instants serialize identically (join state, tests).
        return value.astimezone(UTC)

    @classmethod
    def v2(cls, **fields: Any) -> Self:
        """The event at schema version 2 (what a producer writes once all readers take v2)."""
        return cls(schema_version=2, **fields)

    def to_bytes(self) -> bytes:
        """UTF-8 JSON, the wire format of both backends."""
        return self.model_dump_json().encode("utf-8")


def _per_item(values: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
    """Shared check of a v2 per-shown-item list: a v2 event, one entry per candidate."""
    if values is None:
        return None
    _needs_v2(info)
    shown = info.data.get("candidate_ids")
    if shown is not None and len(values) != len(shown):
        raise ValueError(f"needs one entry per candidate id ({len(shown)}), got {len(values)}")
    return values


def _needs_v2(info: ValidationInfo) -> None:
    version = info.data.get("schema_version", 1)
    if version < 2:
        raise ValueError(f"is a schema version 2 field, the event has schema_version {version}")


class Impression(_Event):
    """A ranking served for one request; ``candidate_ids`` in the order shown (rank 1 first).

    The v2 fields are described in the module docstring.

    Examples
    --------
    >>> from datetime import datetime, UTC
    >>> imp = Impression.v2(request_id="r1", query_id="q1", query="sort a list",
    ...                     candidate_ids=["a", "b"], model_version="m",
    ...                     event_time=datetime(2026, 1, 1, tzinfo=UTC),
    ...                     unknown_candidate_ids=["b"], propensities=[0.9, 0.5])
    >>> parse_event(imp.to_bytes()) == imp
    True
    >>> Impression(request_id="r1", query_id="q1", query="x", candidate_ids=["a"],
    ...            model_version="m", event_time=imp.event_time, teams=["A"])
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Impression
    teams
      Value error, is a schema version 2 field, the event has schema_version 1 ...
    """

    type: Literal["impression"] = "impression"
    query_id: NonEmpty
    query: NonEmpty
    candidate_ids: list[NonEmpty] = Field(min_length=1)
    model_version: NonEmpty
    # Schema version 2 (declared last: a v1 impression's JSON is unchanged).
    unknown_candidate_ids: list[NonEmpty] = Field(default_factory=list)
    propensities: list[Propensity] | None = None
    teams: list[Team | None] | None = None

    @field_validator("candidate_ids")
    @classmethod
    def _unique(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise ValueError(f"candidate ids must be unique, {dup!r} is repeated")
        return ids

    @field_validator("unknown_candidate_ids")
    @classmethod
    def _declared_unknown(cls, ids: list[str], info: ValidationInfo) -> list[str]:
        if not ids:
            return ids
        _needs_v2(info)
        if len(set(ids)) != len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise ValueError(f"ids must be unique, {dup!r:.60} is repeated")
        shown = info.data.get("candidate_ids")
        if shown is not None:
            known = set(shown)
            stray = next((i for i in ids if i not in known), None)
            if stray is not None:
                raise ValueError(f"{stray!r:.60} is not one of the candidate_ids")
        return ids

    @field_validator("propensities", "teams")
    @classmethod
    def _one_per_shown(cls, values: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        return _per_item(values, info)

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if self.schema_version < 2:  # v1 bytes stay what v1 writers always wrote
            for name in V2_IMPRESSION_FIELDS:
                out.pop(name, None)
        return out


class Feedback(_Event):
    """One action on one shown candidate; ``position`` is its 1-based rank in the impression.

    Schema version 2 adds ``unknown_candidate``: the server echoes that its
    impression declared this candidate unknown (ranked by the fallback), so the
    candidate-store check exempts it as it exempts the impression's declared ids;
    and ``propensity``: the examination probability of ``position`` that whoever
    logged the click knew (a simulator's click model, a randomized-swap estimate).
    """

    type: Literal["feedback"] = "feedback"
    candidate_id: NonEmpty
    action: Literal["click", "accept", "skip"]
    position: int = Field(ge=1)
    dwell_ms: float | None = Field(None, ge=0, allow_inf_nan=False)
    unknown_candidate: bool = False
    propensity: Propensity | None = None

    @field_validator("unknown_candidate")
    @classmethod
    def _declared(cls, value: bool, info: ValidationInfo) -> bool:
        if value:
            _needs_v2(info)
        return value

    @field_validator("propensity")
    @classmethod
    def _logged(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None:
            _needs_v2(info)
        return value

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if self.schema_version < 2:
            for name in V2_FEEDBACK_FIELDS:
                out.pop(name, None)
        return out


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
    """Decode one message; raise :class:`InvalidEvent` (and nothing else) when it is not valid.

    A v1 message is read as v1 even if it carries v2 fields (they are dropped, as
    any unknown field is); a version this reader does not know is rejected with
    code ``unsupported_version``.
    """
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
    if version == 1:
        v2 = V2_IMPRESSION_FIELDS + V2_FEEDBACK_FIELDS
        data = {k: v for k, v in data.items() if k not in v2}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # defensive
        raise InvalidEvent(f"invalid event: {exc}") from None
