"""Drift statistics and detectors shared by the server and the trainer.

Two kinds of drift matter to a distilled student:

* the *inputs* move away from what it was trained on: the share of query subwords
  outside its vocabulary, and the distance between recent query embeddings and the
  training queries' (:func:`mmd2`, tested by permutation in :func:`mmd_test`);
* its *behaviour* moves: online quality, agreement with the teacher, the share of
  candidates the store has no vector for.

Each signal is a stream of numbers; a :class:`Detector` (river's ``ADWIN`` or
``PageHinkley``) turns it into detections, and holds its state for a while after one
so a scrape every few seconds cannot miss it.

References
----------
Gretton et al., "A Kernel Two-Sample Test", JMLR 13 (2012): the unbiased MMD²
estimator and the median heuristic for the kernel width. Bifet & Gavaldà, "Learning
from Time-Changing Data with Adaptive Windowing", SDM 2007 (ADWIN). Page, "Continuous
Inspection Schemes", Biometrika 41 (1954) (Page-Hinkley).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np

DetectorKind = Literal["adwin", "page-hinkley"]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aa = np.einsum("ij,ij->i", a, a)[:, None]
    bb = np.einsum("ij,ij->i", b, b)[None, :]
    return np.maximum(aa + bb - 2.0 * (a @ b.T), 0.0)


def median_bandwidth(x: np.ndarray, max_points: int = 1000) -> float:
    """The median pairwise distance of ``x`` (the median heuristic for an RBF width).

    >>> median_bandwidth(np.array([[0.0, 0.0], [3.0, 4.0]]))
    5.0
    """
    x = np.asarray(x, dtype=np.float64)[:max_points]
    d = _sq_dists(x, x)[np.triu_indices(len(x), k=1)]
    med = float(np.sqrt(np.median(d))) if d.size else 1.0
    return med if med > 0 else 1.0


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD² between samples ``x`` [m, d] and ``y`` [n, d], RBF kernel.

    ``k(a, b) = exp(-|a - b|² / (2 bandwidth²))``. Near 0 (it can be slightly
    negative) when both come from one distribution; it grows as they separate.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    >>> bw = median_bandwidth(a)
    >>> abs(mmd2(a, b, bw)) < 0.01, mmd2(a, b + 2.0, bw) > 0.1
    (True, True)
    """
    return mmd_test(x, y, bandwidth, permutations=0)[0]


def mmd_test(x: np.ndarray, y: np.ndarray, bandwidth: float, permutations: int = 100,
             seed: int = 0) -> tuple[float, float]:
    """MMD² of ``x`` against ``y`` and its permutation p-value.

    The p-value is the share of random re-splits of the pooled points whose MMD² is
    at least the observed one (with the usual +1 correction), so it is calibrated
    whatever the embedding space looks like; the same test alibi-detect's
    ``MMDDrift`` runs. One kernel matrix serves every permutation.

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    >>> bw = median_bandwidth(a)
    >>> mmd_test(a, b, bw)[1] > 0.05, mmd_test(a, b + 1.0, bw)[1] < 0.01
    (True, True)
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("mmd_test needs at least two points in each sample")
    z = np.concatenate([x, y])
    k = np.exp(-_sq_dists(z, z) / (2.0 * bandwidth * bandwidth))
    rng = np.random.default_rng(seed)
    masks = np.zeros((permutations + 1, n + m))
    masks[0, :n] = 1.0  # the observed split first
    for row in masks[1:]:
        row[rng.permutation(n + m)[:n]] = 1.0
    ka = masks @ k
    xx = (ka * masks).sum(1) - n  # the diagonal (k = 1) is left out: unbiased
    total = k.sum() - (n + m)
    xy = ka.sum(1) - (ka * masks).sum(1)
    yy = total - xx - 2.0 * xy
    stats = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)
    p = float((1 + (stats[1:] >= stats[0]).sum()) / (permutations + 1))
    return float(stats[0]), p


class Detector:
    """A river drift detector on one signal, with a held state.

    Parameters
    ----------
    kind
        ``"adwin"`` (two-sided: any change of the mean) or ``"page-hinkley"``
        (a rise of the mean, river's default mode).
    delta
        ADWIN's confidence; Page-Hinkley uses river's defaults.
    hold_s
        :meth:`in_drift` stays True this long after a detection.
    clock
        ADWIN looks for a change every ``clock`` updates (river's 32 suits a value per
        request; a value per window wants 1).

    Examples
    --------
    >>> d = Detector("adwin", hold_s=60)
    >>> hits = [d.update(0.1 if i < 300 else 0.9, now=float(i)) for i in range(600)]
    >>> any(hits[:300]), hits.index(True) - 300 < 50, d.detections
    (False, True, 1)
    >>> d.in_drift(now=hits.index(True) + 10.0), d.in_drift(now=hits.index(True) + 61.0)
    (True, False)
    """

    def __init__(self, kind: DetectorKind = "adwin", delta: float = 0.002,
                 hold_s: float = 60.0, clock: int = 32) -> None:
        from river import drift  # slow to import: only when a detector is built

        self.kind, self.hold_s = kind, hold_s
        if kind == "adwin":
            self._d: Any = drift.ADWIN(delta=delta, clock=clock)
        elif kind == "page-hinkley":
            self._d = drift.PageHinkley()
        else:
            raise ValueError(f"unknown detector {kind!r} (adwin, page-hinkley)")
        self.detections = 0
        self.last_detection: float | None = None
        self.n = 0

    def update(self, value: float, now: float | None = None) -> bool:
        """Feed one value; True when it completes a detection."""
        self._d.update(float(value))
        self.n += 1
        if self._d.drift_detected:
            self.detections += 1
            self.last_detection = time.monotonic() if now is None else now
            return True
        return False

    def in_drift(self, now: float | None = None) -> bool:
        if self.last_detection is None:
            return False
        now = time.monotonic() if now is None else now
        return now - self.last_detection < self.hold_s
