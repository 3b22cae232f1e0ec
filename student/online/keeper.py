"""Keeping the trainer's teacher version: a lease while it runs, and proof that it is still there.

* **A lease, not a pin.** A durable pin belongs to a saved artifact and stays
  until that artifact is removed; a trainer is a running process, and one that is
  SIGKILLed removes nothing. So the trainer *leases* its version for
  ``lease_ttl_s``, renews the lease once a third of that has passed (checked at
  every batch boundary and every turn of the wait loop, so a trainer idle for lack
  of data keeps it too), and releases it when ``run`` returns. A killed trainer's
  lease runs out on its own.
* **A lost store.** A Redis without persistence that restarts is reachable but
  empty; a rebuilt embedded store may hold less than before. Training on would
  dead-letter every event as an unknown candidate and train on label misses, and
  a checkpoint would then make that permanent. So the version must be present,
  complete and hold at least the embeddings and labels that the last checkpoint
  saw (``TrainerState.store_counts``): checked on resume, after every store
  outage (before the call that ended it hands its answer back: that answer may
  come from the empty store) and before every checkpoint. A failed check is a
  :class:`StoreLost`: nothing past the last good checkpoint is saved or committed.
  A loss with no outage to see (a server restarted between two calls, data deleted
  behind the store's back) is caught by the check before the next checkpoint; the
  batches since the last one may have sent dead letters by then, but are neither
  checkpointed nor committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from stores.base import Store, StoreError, VersionError, VersionInfo
from student.online.bootstrap import TrainerError
from student.online.faults import Retry

log = logging.getLogger("codistill.trainer")
COUNTED = ("embeddings", "labels")


class StoreLost(TrainerError):
    """The store no longer holds (all of) the trainer's teacher version."""


class VersionKeeper:
    """The trainer's lease on its teacher version and the checks that the version is intact.

    Parameters
    ----------
    store
        The label store.
    owner
        The lease owner (``trainer:NAME``).
    ttl_s
        Lease duration; renewed after a third of it.
    retry
        The trainer's retry function.
    clock
        Monotonic seconds (tests may pass a fake one).
    """

    def __init__(self, store: Store, owner: str, ttl_s: float, retry: Retry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.owner, self.ttl_s = store, owner, ttl_s
        self.retry, self.clock = retry, clock
        self.version: str | None = None
        self.recorded: dict[str, int] = {}
        self._renewed_at = 0.0
        self._checking = False
        self._outage_ended = False

    def take(self, version: str, recorded: Mapping[str, int]) -> dict[str, int]:
        """Lease ``version`` and check it against the counts a checkpoint ``recorded``.

        Parameters
        ----------
        version
            The resolved teacher version.
        recorded
            ``store_counts`` of the checkpoint resumed from (empty for a fresh trainer).

        Returns
        -------
        dict[str, int]
            The version's counts now.

        Raises
        ------
        StoreLost
            When the version is gone, incomplete or holds fewer records.
        """
        self.version, self.recorded = version, dict(recorded)
        self._lease()
        # a trainer of an earlier release pinned its version durably: that pin is ours to drop
        self.retry("store", "unpin", lambda: self.store.unpin(version, self.owner))
        return self.check("on start")

    def renew_if_due(self) -> None:
        """Renew the lease once a third of its TTL has passed since the last renewal."""
        if self.version is not None and self.clock() - self._renewed_at >= self.ttl_s / 3:
            self._lease()

    def _lease(self) -> None:
        version = self.version
        assert version is not None
        try:
            self.retry("store", "lease",
                       lambda: self.store.lease(version, self.owner, self.ttl_s))
        except VersionError as exc:  # the store no longer knows the version
            raise self._lost(f"cannot lease it ({exc})", "on lease renewal") from exc
        self._renewed_at = self.clock()

    def release(self) -> None:
        """Give the lease back (best effort: an unreachable store lets it run out instead)."""
        version, self.version = self.version, None
        if version is None:
            return
        try:
            self.store.release(version, self.owner)
        except StoreError as exc:
            log.warning("could not release the lease on %s (%s); it runs out within %.0f s",
                        version, exc, self.ttl_s)

    def check(self, when: str) -> dict[str, int]:
        """The version's counts, after checking it is present, complete and not smaller.

        Parameters
        ----------
        when
            For the error message (``"before checkpoint 12"``, ...).

        Returns
        -------
        dict[str, int]
            ``embeddings`` and ``labels`` as the manifest counts them now.

        Raises
        ------
        StoreLost
            When the version is gone, incomplete, or holds fewer embeddings or
            labels than :attr:`recorded`.
        """
        return self._checked(when)[1]

    def sequence(self, when: str) -> int:
        """The version's store sequence now, after the checks of :meth:`check`.

        A batch's store reads are pinned to it (``max_seq``), so whether a candidate
        is known and which labels a batch gets do not depend on when it is applied.
        """
        return int(self._checked(when)[0].sequence)

    def _checked(self, when: str) -> tuple[VersionInfo, dict[str, int]]:
        version = self.version
        assert version is not None
        self._checking, self._outage_ended = True, False
        try:
            info = self.retry("store", "get_version", lambda: self.store.get_version(version))
        finally:
            self._checking = False
        if self._outage_ended:  # this very call waited out an outage: say so
            when = f"after a store outage, {when}"
        if info is None:
            raise self._lost("it is gone: the store was lost or replaced", when)
        if info.status != "complete":
            raise self._lost(f"it is {info.status!r}, not complete", when)
        counts = {k: int(info.counts.get(k, 0)) for k in COUNTED}
        short = [f"{k} {counts.get(k, 0)} < {n}" for k, n in sorted(self.recorded.items())
                 if counts.get(k, 0) < n]
        if short:
            raise self._lost("it holds fewer records than this trainer's last checkpoint "
                             f"saw ({', '.join(short)})", when)
        return info, counts

    def on_recovered(self, kind: str) -> None:
        """The retry function's hook: a store outage just ended, so check the version first."""
        if kind == "store" and self.version is not None:
            if self._checking:  # the check's own read recovered: it checks the answer itself
                self._outage_ended = True
            else:
                self.check("after a store outage")

    def _lost(self, what: str, when: str) -> StoreLost:
        return StoreLost(
            f"{self.store.describe()}: teacher version {self.version!r} of {self.owner} - "
            f"{what} ({when}). Stopping without checkpointing or committing "
            "past the last good checkpoint; rebuild the version (codistill teacher "
            "precompute), then restart the trainer")
