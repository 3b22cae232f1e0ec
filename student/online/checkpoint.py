"""Atomic trainer checkpoints and the ledger of applied batches.

A checkpoint is everything the online trainer needs to continue *as if it had
never stopped*: the student (a loadable student directory: ``config.json`` +
``model.safetensors``), the optimizer state (tensors as safetensors, the rest
JSON), RNG states, the drift detectors' inputs (``drift.json``), and
``state.json`` with the next offset per partition, the Joiner state, counters,
the store counts last checked, the hyperparameter segments and the
:class:`Ledger`. JSON and safetensors only: unpickling runs code, so a checkpoint
carrying a pickle payload is refused (:func:`refuse_pickles`). Layout::

    <root>/LATEST                 "ckpt-000000012"  (the only source of truth)
    <root>/ckpt-000000009/ ...    the previous one (kept: last ``keep``)
    <root>/ckpt-000000012/ ...

Writing: files go into ``.tmp-*``, each is fsynced, the directory is fsynced and
renamed to ``ckpt-N``, then ``LATEST`` is replaced atomically (tmp + fsync +
rename + fsync of the directory). A crash at any point leaves ``LATEST`` naming a
complete checkpoint; a renamed directory that ``LATEST`` does not name yet is an
orphan and is removed by :meth:`CheckpointManager.cleanup`. The trainer commits
offsets to its consumer group only after ``save`` returned, so committed offsets
never run ahead of a checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from codistill.fsio import atomic_write_text, publish_dir, write_synced
from student.base import Student
from student.online.schedule import FLUSH_PARTITION  # noqa: F401 - re-exported (ledger keys)

LATEST = "LATEST"
STATE_FILE = "state.json"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG_FILE = "rng.safetensors"
DRIFT_FILE = "drift.json"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth")
STATE_FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{9,})$")

Key = tuple[str, int, int, int]  # (topic, partition, start offset, end offset)


class LedgerViolation(RuntimeError):
    """A batch overlapping an already applied one was about to be applied again."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not belong to this trainer."""


class Ledger:
    """Which offset ranges have been applied to the model, per (topic, partition).

    Applied ranges are kept merged (contiguous batches collapse into one interval),
    so the exactly-once check stays O(1) in memory however long the trainer runs;
    the last ``keep_recent`` keys are kept verbatim for audits and tests.

    Parameters
    ----------
    keep_recent
        How many of the last applied keys :attr:`recent` keeps.
    """

    def __init__(self, keep_recent: int = 10_000) -> None:
        self.intervals: dict[tuple[str, int], list[list[int]]] = {}
        self.starts: dict[tuple[str, int], int] = {}  # first offset per partition (default 0)
        self.gaps: dict[tuple[str, int], list[list[int]]] = {}  # accepted, never applied
        self.recent: list[Key] = []
        self.count = 0
        self.keep_recent = keep_recent

    def overlaps(self, key: Key) -> list[int] | None:
        topic, partition, start, end = key
        for lo, hi in self.intervals.get((topic, partition), []):
            if start < hi and lo < end:
                return [lo, hi]
        return None

    def check(self, key: Key) -> None:
        """Raise :class:`LedgerViolation` if any offset of ``key`` was applied before."""
        if key[3] <= key[2]:
            raise ValueError(f"empty or reversed batch {key}")
        hit = self.overlaps(key)
        if hit is not None:
            raise LedgerViolation(
                f"batch {key[0]}[{key[1]}] offsets [{key[2]}, {key[3]}) overlaps the applied "
                f"range [{hit[0]}, {hit[1]}): applying it would update the model twice"
            )

    def record(self, key: Key) -> None:
        """Mark ``key`` applied (after :meth:`check`), merging it into its partition's spans."""
        self.check(key)
        topic, partition, start, end = key
        spans = self.intervals.get((topic, partition), [])
        self.intervals[(topic, partition)] = _merge([*spans, [start, end]])
        self.recent.append(key)
        del self.recent[: max(len(self.recent) - self.keep_recent, 0)]
        self.count += 1

    def begin(self, topic: str, partition: int, start: int) -> None:
        """Record where a partition's history starts (the log start or end it began at)."""
        self.starts[(topic, partition)] = int(start)

    def record_gap(self, topic: str, partition: int, start: int, end: int) -> None:
        """Record ``[start, end)`` as skipped, never applied (an accepted retention gap)."""
        self.gaps.setdefault((topic, partition), []).append([int(start), int(end)])

    def check_resume(self, topic: str, offsets: dict[int, int]) -> None:
        """Raise :class:`LedgerViolation` unless ``offsets`` are exactly what was applied.

        Batches are contiguous from the partition's recorded start (:meth:`begin`;
        0 by default), so partition ``p`` resumes at ``next`` only if its applied
        ranges and accepted gaps together cover ``[start, next)`` and nothing beyond;
        anything else means the offsets and the weights come from different histories.

        Parameters
        ----------
        topic
            The events topic.
        offsets
            The next offset per partition, as a checkpoint holds them.
        """
        for p, nxt in offsets.items():
            spans = self.intervals.get((topic, p), [])
            start = self.starts.get((topic, p), 0)
            covered = _merge(spans + self.gaps.get((topic, p), []))
            if covered != ([[start, nxt]] if nxt > start else []) or nxt < start:
                raise LedgerViolation(
                    f"checkpoint resumes {topic}[{p}] at offset {nxt} but its ledger "
                    f"applied {spans} from offset {start}: offsets and weights disagree, "
                    "refusing to train"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "keep_recent": self.keep_recent,
            "intervals": [[t, p, spans] for (t, p), spans in sorted(self.intervals.items())],
            "starts": [[t, p, o] for (t, p), o in sorted(self.starts.items())],
            "gaps": [[t, p, spans] for (t, p), spans in sorted(self.gaps.items())],
            "recent": [list(k) for k in self.recent],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        ledger = cls(int(data.get("keep_recent", 10_000)))
        ledger.count = int(data["count"])
        ledger.intervals = {(t, int(p)): [[int(a), int(b)] for a, b in spans]
                            for t, p, spans in data["intervals"]}
        ledger.starts = {(t, int(p)): int(o) for t, p, o in data.get("starts", [])}
        ledger.gaps = {(t, int(p)): [[int(a), int(b)] for a, b in spans]
                       for t, p, spans in data.get("gaps", [])}
        ledger.recent = [(str(t), int(p), int(a), int(b)) for t, p, a, b in data["recent"]]
        return ledger


def _merge(spans: list[list[int]]) -> list[list[int]]:
    """Sorted, touching or overlapping ``[lo, hi)`` spans merged.

    >>> _merge([[4, 8], [0, 4], [10, 12]])
    [[0, 8], [10, 12]]
    """
    merged: list[list[int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


@dataclass
class TrainerState:
    """The JSON part of a checkpoint (``state.json``)."""

    name: str
    teacher_version: str
    topic: str
    batch_size: int
    batches: int = 0  # applied units (offset batches + the final flush), the ledger's count
    optimizer_steps: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # next offset per partition
    turn: int = 0  # round-robin position (index into the sorted partitions)
    flushed: bool = False
    joiner: dict[str, Any] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    counters: dict[str, float] = field(default_factory=dict)
    store_counts: dict[str, int] = field(default_factory=dict)  # the version's, when last checked
    segments: list[dict[str, Any]] = field(default_factory=list)  # see student.online.resume
    python_rng: Any = None
    numpy_rng: Any = None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "ledger"}
        data["offsets"] = {str(p): o for p, o in sorted(self.offsets.items())}
        data["ledger"] = self.ledger.to_json()
        data["format"] = STATE_FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        if data.get("format") != STATE_FORMAT:
            raise CheckpointError(f"unsupported checkpoint state format {data.get('format')!r}")
        data = dict(data)
        data.pop("format")
        data["offsets"] = {int(p): int(o) for p, o in data["offsets"].items()}
        data["ledger"] = Ledger.from_json(data["ledger"])
        return cls(**data)


# -- RNG and optimizer (de)serialisation -------------------------------------------------------
def capture_rng(state: TrainerState) -> dict[str, torch.Tensor]:
    """Fill the Python / NumPy RNG states into ``state``; return torch's as tensors."""
    version, internal, gauss = random.getstate()
    state.python_rng = [version, list(internal), gauss]
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state.numpy_rng = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return {"torch": torch.get_rng_state()}


def restore_rng(state: TrainerState, tensors: dict[str, torch.Tensor]) -> None:
    """Set the Python, NumPy and torch RNGs back to what :func:`capture_rng` saved."""
    if state.python_rng is not None:
        version, internal, gauss = state.python_rng
        random.setstate((version, tuple(internal), gauss))
    if state.numpy_rng is not None:
        kind, keys, pos, has_gauss, cached = state.numpy_rng
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])


def optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's ``state_dict`` as (tensors for safetensors, JSON-ready rest).

    Parameters
    ----------
    optimizer
        Any torch optimizer.

    Returns
    -------
    tuple[dict[str, torch.Tensor], dict]
        ``state.<param index>.<name>`` -> tensor (views of the live state: save or
        copy them before the next step), and ``param_groups`` + non-tensor state.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other,
                     "class": type(optimizer).__name__}


def optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_split`: a ``state_dict`` for ``load_state_dict``.

    Parameters
    ----------
    tensors, meta
        The two halves :func:`optimizer_split` returned.

    Returns
    -------
    dict
        ``{"state": {param index: {name: value}}, "param_groups": [...]}``.
    """
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["state"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- files ----------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    write_synced(path, json.dumps(data, sort_keys=True))


@dataclass
class Checkpoint:
    """A loaded checkpoint; the student is rebuilt by the caller with ``Student.load(path)``."""

    path: Path
    state: TrainerState
    optimizer_state: dict[str, Any]
    rng: dict[str, torch.Tensor]
    drift: dict[str, Any] | None


class CheckpointManager:
    """Writes and reads checkpoints under ``root`` (see the module docstring).

    Parameters
    ----------
    root
        The trainer's checkpoint directory (created if missing).
    keep
        Complete checkpoints kept (the newest ``keep``).
    """

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def try_lock(self) -> IO[bytes] | None:
        """Lock ``<root>/.lock`` exclusively: the open file holding it, or None when another
        process holds it (the OS drops the lock when the holder dies, SIGKILL included)."""
        lock = open(self.root / ".lock", "a+b")  # noqa: SIM115 - held until unlock
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        return lock

    @staticmethod
    def unlock(lock: IO[bytes]) -> None:
        """Release a lock taken by :meth:`try_lock`."""
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()

    @staticmethod
    def dir_name(batches: int) -> str:
        return f"ckpt-{batches:09d}"

    def latest_path(self) -> Path | None:
        try:
            name = (self.root / LATEST).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        path = self.root / name
        if not _NAME.match(name) or not (path / STATE_FILE).exists():
            raise CheckpointError(f"{self.root / LATEST} names {name!r}, which is not complete")
        return path

    def cleanup(self) -> list[Path]:
        """Remove temp dirs and orphans (renamed but never made LATEST); keep the last ``keep``."""
        latest = self.latest_path()
        removed: list[Path] = []
        dirs = sorted((p for p in self.root.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
        keep: set[Path] = set()
        if latest is not None:
            older = [p for p in dirs if p.name <= latest.name]
            keep = set(older[-self.keep:])
        for path in self.root.iterdir():
            if (path.name.startswith((".tmp-", f".{LATEST}.")) or
                    (_NAME.match(path.name) and path not in keep)):
                self._remove(path)
                removed.append(path)
        return removed

    def _remove(self, path: Path) -> None:
        """Rename out of the ``ckpt-*`` namespace first: a crash mid-delete leaves a ``.tmp-*``
        (removed next time), never a half-deleted ``ckpt-*``."""
        if not path.is_dir():
            path.unlink(missing_ok=True)
            return
        if not path.name.startswith(".tmp-"):
            trash = self.root / f".tmp-del-{path.name}-{os.getpid()}"
            os.rename(path, trash)
            path = trash
        shutil.rmtree(path, ignore_errors=True)

    def save(
        self,
        student: Student,
        optimizer: torch.optim.Optimizer,
        state: TrainerState,
        drift: dict[str, Any] | None = None,
        before_switch: Callable[[], None] | None = None,
    ) -> Path:
        """Write checkpoint ``state.batches`` atomically and make it LATEST.

        Parameters
        ----------
        student, optimizer
            The model and its optimizer.
        state
            Offsets, joiner, counters, ledger; its RNG fields are filled here.
        drift
            The drift monitor's JSON state (``drift.json``).
        before_switch
            Called after the rename, before ``LATEST`` moves (the crash hook).

        Returns
        -------
        Path
            The new checkpoint directory.
        """
        final = self.root / self.dir_name(state.batches)
        if final == self.latest_path():
            raise CheckpointError(f"{final} is LATEST already; a new checkpoint needs progress")
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            self._remove(tmp)
        student.save(tmp)
        rng = capture_rng(state)
        tensors, meta = optimizer_split(optimizer)
        save_file(tensors, str(tmp / OPTIM_TENSORS))
        _write_json(tmp / OPTIM_META, meta)
        save_file(rng, str(tmp / RNG_FILE))
        if drift is not None:
            _write_json(tmp / DRIFT_FILE, drift)
        _write_json(tmp / STATE_FILE, state.to_json())  # written last: marks the dir complete
        if final.exists():  # an orphan of a crash between rename and the LATEST switch
            self._remove(final)
        publish_dir(tmp, final)
        if before_switch is not None:
            before_switch()
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self.cleanup()
        return final

    def load(self, path: Path | None = None) -> Checkpoint | None:
        """The checkpoint at ``path`` (default: LATEST), or None if there is none yet.

        Raises
        ------
        CheckpointError
            When the directory carries a pickle payload (see :func:`refuse_pickles`).
        """
        path = path or self.latest_path()
        if path is None:
            return None
        refuse_pickles(path)
        state = TrainerState.from_json(json.loads((path / STATE_FILE).read_text("utf-8")))
        meta = json.loads((path / OPTIM_META).read_text("utf-8"))
        optim = optimizer_join(load_file(str(path / OPTIM_TENSORS)), meta)
        drift_file = path / DRIFT_FILE
        return Checkpoint(path, state, optim, load_file(str(path / RNG_FILE)),
                          json.loads(drift_file.read_text("utf-8")) if drift_file.exists()
                          else None)


def refuse_pickles(path: Path) -> None:
    """Raise :class:`CheckpointError` if a file under ``path`` looks like a pickle.

    A pickle is a ``.pkl``-like name (``drift.pkl`` of earlier releases included) or
    content starting with the protocol byte ``0x80``. A safetensors file may start
    with that byte too (its first 8 bytes are the header length), so one is
    accepted when its header is what safetensors writes: a length that fits the
    file, followed by ``{``.

    Parameters
    ----------
    path
        A checkpoint directory.
    """
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            head = fh.read(9)
        header = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
        safetensors = (file.suffix == ".safetensors" and head[8:9] == b"{"
                       and 8 + header <= file.stat().st_size)
        if file.suffix in PICKLE_SUFFIXES or (head[:1] == b"\x80" and not safetensors):
            raise CheckpointError(
                f"{file} carries a pickle payload: trainer checkpoints hold JSON and "
                "safetensors only (unpickling runs code), so this checkpoint is refused. "
                "Remove the file if it is yours (a drift.pkl of an earlier release: the "
                "drift detectors then start empty), or start afresh under another name.")
