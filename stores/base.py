"""Store interfaces shared by the teacher (writer) and students / servers (readers).

Like Feast's online store, one backend holds everything a consumer needs at
serving or training time, keyed by *teacher version*:

* candidate texts (``candidate id -> code``; version independent, ids are content hashes),
* per version, the teacher's embedding of each candidate,
* per version, one soft-label record per query,
* a manifest of versions, the *current* version and the pins held on versions.

A version is written while its status is ``writing``, marked ``complete``, and
only then may become *current*: the switch is one atomic operation, and every
record lives under its own version's keys, so a reader that resolved a version
reads whole records of that version only. Consumers *pin* the version they were
built on; a pinned or current version is never deleted or expired.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class StoreError(RuntimeError):
    """Base class for store failures."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (names the address). Callers may retry."""


class VersionError(StoreError):
    """An operation that the version's state forbids (unknown, incomplete, pinned, current)."""


class VersionInfo(BaseModel):
    """Manifest entry of one teacher version in a store.

    ``sequence`` counts the records appended after the version became complete:
    records written while ``writing`` have sequence 0, the ``n``-th appended one has
    ``n``. A reader that notes the sequence once and passes it as ``max_seq`` sees the
    version as it was then, however much is appended meanwhile.
    """

    teacher_version: str
    model: str
    logit_scale: float = Field(gt=0)
    dim: int = Field(gt=0)
    embedding_dtype: Literal["float16", "float32"] = "float16"
    status: Literal["writing", "complete"] = "writing"
    created_at: str = Field(default_factory=lambda: utc_now())
    completed_at: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    meta: dict[str, str] = Field(default_factory=dict)
    sequence: int = Field(0, ge=0, description="records appended since completion")


class SoftLabelRecord(BaseModel):
    """The teacher's view of one query's candidate list.

    ``scores`` are raw cosine similarities; the teacher's logits are
    ``logit_scale * scores`` and soft labels ``softmax(logits / T)``. The scale is
    stored with every record because soft labels are meaningless without it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    query_id: str
    teacher_version: str
    candidate_ids: list[str]
    scores: np.ndarray  # float32, shape (n_candidates,)
    query_embedding: np.ndarray  # float32 or float16, shape (dim,)
    logit_scale: float

    def soft_labels(self, temperature: float = 1.0) -> np.ndarray:
        logits = self.logit_scale * self.scores.astype(np.float64) / temperature
        logits -= logits.max()
        p = np.exp(logits)
        return (p / p.sum()).astype(np.float32)


class Hold(BaseModel):
    """Something that keeps a version from being deleted or expired.

    ``pin``: durable, held by a saved artifact (a registered student, a serving
    bundle) and removed only with it. ``lease``: held by a *running* process (a
    distillation, a trainer, a server) that renews it before ``expires_at``; a
    process that dies stops renewing, and its lease runs out on its own.
    """

    version: str
    kind: Literal["pin", "lease"]
    owner: str
    created_at: float = Field(description="unix seconds")
    expires_at: float | None = Field(None, description="unix seconds; None for a pin")

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@runtime_checkable
class CandidateStore(Protocol):
    """Candidate texts (any version) and the teacher's candidate embeddings (per version).

    Writes to a ``writing`` version insert or replace; writes to a ``complete`` one
    insert only ids it lacks (never overwrite), each with the next sequence number.
    Both return how many records they wrote. ``max_seq`` on a read hides records
    appended after that sequence number (see :class:`VersionInfo`).
    """

    def put_texts(self, texts: Mapping[str, str]) -> None: ...
    def get_texts(self, ids: Sequence[str]) -> list[str | None]: ...
    def put_embeddings(self, version: str, ids: Sequence[str], embeddings: np.ndarray) -> int: ...
    def get_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(matrix float32 [n, dim], found bool [n])``; missing rows are zeros."""
        ...
    def has_embeddings(self, version: str, ids: Sequence[str], max_seq: int | None = None
                       ) -> np.ndarray: ...
    def iter_candidate_ids(self, version: str) -> Iterator[str]: ...


@runtime_checkable
class LabelStore(Protocol):
    """One soft-label record per (version, query); appends as in :class:`CandidateStore`."""

    def put_labels(self, records: Sequence[SoftLabelRecord]) -> int: ...
    def get_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> list[SoftLabelRecord | None]: ...
    def has_labels(self, version: str, query_ids: Sequence[str], max_seq: int | None = None
                   ) -> np.ndarray: ...


@runtime_checkable
class VersionManifest(Protocol):
    def begin_version(self, info: VersionInfo) -> None:
        """Register a version as ``writing`` (idempotent: resuming keeps the existing entry)."""
        ...
    def complete_version(self, version: str, counts: Mapping[str, int] | None = None) -> None: ...
    def get_version(self, version: str) -> VersionInfo | None: ...
    def versions(self) -> list[VersionInfo]: ...
    def set_current(self, version: str) -> None:
        """Atomically make a *complete* version current (VersionError otherwise)."""
        ...
    def current(self) -> str | None: ...
    def pin(self, version: str, consumer: str) -> None:
        """A durable pin (see :class:`Hold`); VersionError for an unknown version."""
        ...
    def unpin(self, version: str, consumer: str) -> None: ...
    def pins(self, version: str) -> set[str]:
        """Owners of the durable pins of ``version``."""
        ...
    def lease(self, version: str, owner: str, ttl_s: float) -> Hold:
        """Take or renew ``owner``'s lease for ``ttl_s`` seconds from now (see :class:`Hold`)."""
        ...
    def release(self, version: str, owner: str) -> None: ...
    def holds(self, version: str) -> list[Hold]:
        """Durable pins and live leases of ``version``; expired leases are collected."""
        ...
    def delete_version(self, version: str) -> None:
        """Delete a version's embeddings and labels; VersionError if current, pinned or
        leased (live leases only)."""
        ...
    def read_current_labels(self, query_ids: Sequence[str]) -> tuple[str, list[SoftLabelRecord | None]]:
        """Resolve the current version and read labels from it, consistently."""
        ...
    def expire_stale_versions(self) -> list[str]:
        """With ``store.ttl_s`` set: give every complete version that is neither current,
        pinned nor leased a deadline ``ttl_s`` from the first sweep that finds it so (a
        later sweep keeps it; becoming current, pinned or leased removes it), and drop
        the versions past theirs (Redis: key TTLs, the manifest entry at a later sweep;
        embedded: deleted by the first sweep past the deadline). Returns the versions
        that carry a deadline; a no-op without ``ttl_s``."""
        ...
    def expiring(self) -> dict[str, float]:
        """Versions with an expiry deadline (unix seconds), see :meth:`expire_stale_versions`."""
        ...


@runtime_checkable
class Store(CandidateStore, LabelStore, VersionManifest, Protocol):
    """Everything one backend provides; what ``stores.open_store(settings)`` returns."""

    def close(self) -> None: ...
    def describe(self) -> str:
        """Human-readable location, e.g. ``redis://127.0.0.1:6379/0 ns=codistill``."""
        ...


# -- helpers every backend shares ------------------------------------------------------------
def utc_now() -> str:
    """Timestamps in manifests: ISO 8601, UTC."""
    return datetime.now(UTC).isoformat()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items (one batched round trip each).

    >>> [list(c) for c in chunks([1, 2, 3, 4, 5], 2)]
    [[1, 2], [3, 4], [5]]
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_resume(existing: VersionInfo, info: VersionInfo) -> None:
    """Resuming a version is fine; reusing its name for a different teacher is not."""
    fields = ("model", "dim", "logit_scale", "embedding_dtype")
    diff = {
        f: (getattr(existing, f), getattr(info, f))
        for f in fields
        if getattr(existing, f) != getattr(info, f)
    }
    if diff:
        detail = ", ".join(f"{f}: stored {a!r} != given {b!r}" for f, (a, b) in diff.items())
        raise VersionError(f"version {info.teacher_version!r} exists with different {detail}")


def completed_info(
    info: VersionInfo, measured: Mapping[str, int], counts: Mapping[str, int] | None
) -> VersionInfo:
    """The manifest entry marked complete; measured counts, overridden by the caller's."""
    return info.model_copy(
        update={
            "status": "complete",
            "completed_at": info.completed_at or utc_now(),
            "counts": {**info.counts, **measured, **(counts or {})},
        }
    )
