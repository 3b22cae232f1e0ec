"""Candidate + soft-label stores: one interface (:class:`Store`), two backends.

``open_store(settings)`` returns the embedded SQLite store (default, no server)
or the Redis store; callers depend only on :class:`stores.base.Store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stores.base import (
    CandidateStore,
    Hold,
    LabelStore,
    SoftLabelRecord,
    Store,
    StoreError,
    StoreUnavailable,
    VersionError,
    VersionInfo,
    VersionManifest,
)
from stores.codec import CodecError
from stores.embedded import EmbeddedStore

if TYPE_CHECKING:
    from codistill.config import Settings, StoreSettings
    from stores.redis_store import RedisStore

__all__ = [
    "CandidateStore",
    "CodecError",
    "EmbeddedStore",
    "Hold",
    "LabelStore",
    "RedisStore",
    "SoftLabelRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "VersionError",
    "VersionInfo",
    "VersionManifest",
    "open_configured_store",
    "open_store",
]


def open_store(settings: StoreSettings) -> Store:
    """Open the backend ``settings.backend`` names (Redis: pinged now, so a bad URL fails here)."""
    if settings.backend == "embedded":
        if settings.path is None:
            raise ValueError(
                "embedded store needs settings.path; use Settings.resolved_store() "
                "to fill it in from CODISTILL_HOME"
            )
        return EmbeddedStore(settings.path, ttl_s=settings.ttl_s)
    if settings.backend == "redis":
        from stores.redis_store import RedisStore  # redis-py is only needed for this backend

        return RedisStore(
            settings.redis_url,
            settings.namespace,
            batch_size=settings.batch_size,
            ttl_s=settings.ttl_s,
        )
    raise ValueError(f"unknown store backend {settings.backend!r}")


def __getattr__(name: str) -> object:
    """Lazy ``stores.RedisStore`` so importing :mod:`stores` does not require redis-py."""
    if name == "RedisStore":
        from stores.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'stores' has no attribute {name!r}")


def open_configured_store(settings: Settings) -> Store:
    """The store the settings name, with the embedded path resolved under ``home``."""
    return open_store(settings.resolved_store())
