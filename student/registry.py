"""Saved students: ``HOME/students/<student-version>/`` plus a ``current.json`` pointer.

Each folder holds what ``Student.save`` writes (``config.json`` + ``model.safetensors``)
and a ``student.json`` card: the teacher version it was distilled from, the
training recipe, the weights' sha256 and its offline metrics. Like the teacher's
registry, the *student version* is derived from what determines the student's
outputs (kind, teacher version, recipe, weights hash): the same bytes always get
the same id, and a served student can be traced to the exact soft labels it learned
from. A folder is written under a temporary name and renamed into place, so a
reader never sees half a student; ``current.json`` is switched atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from codistill.fsio import (
    atomic_write_text,
    fsync_path,
    publish_dir,
    tensors_digest,
    write_synced,
)
from student.base import WEIGHTS_FILE, Student

CARD_FILE = "student.json"
POINTER_FILE = "current.json"
DELETING = ".deleting-"  # a student on its way out: no longer listed or loadable
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


class StudentIntegrityError(RuntimeError):
    """A student's weights differ from the hash on its card."""


class StudentCard(BaseModel):
    student_version: str = ""
    kind: str
    teacher_version: str
    weights_sha256: str = Field(description="sha256 of the tensors (codistill.fsio.tensors_digest)")
    recipe: dict[str, Any] = Field(default_factory=dict, description="distillation settings")
    size: dict[str, float] = Field(default_factory=dict, description="parameters, megabytes")
    data_hash: str | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="training summary")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    def compute_version(self) -> str:
        ident = {
            "kind": self.kind,
            "teacher": self.teacher_version,
            "recipe": self.recipe,
            "weights": self.weights_sha256,
        }
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        return f"{self.kind}-{hashlib.sha256(blob).hexdigest()[:10]}"


class StudentRegistry:
    """Student folders under ``students_dir`` (normally ``HOME/students``)."""

    def __init__(self, students_dir: str | Path) -> None:
        self.dir = Path(students_dir)

    def path(self, version: str) -> Path:
        return self.dir / version

    def save(self, student: Student, card: StudentCard) -> StudentCard:
        """Write ``student`` with ``card`` (hash and version filled in here); returns the card.

        Saving the same weights with the same recipe again yields the same version and
        only refreshes the card.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            student.save(tmp)
            card = card.model_copy(update={
                "kind": student.kind,
                "teacher_version": student.teacher_version,
                "weights_sha256": tensors_digest(tmp / WEIGHTS_FILE),
            })
            card.student_version = card.compute_version()
            target = self.path(card.student_version)
            if target.exists():  # identical weights and recipe: keep the files, refresh the card
                atomic_write_text(target / CARD_FILE, card.model_dump_json(indent=2))
            else:
                write_synced(tmp / CARD_FILE, card.model_dump_json(indent=2))
                publish_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return card

    def update_card(self, card: StudentCard) -> None:
        """Rewrite the card of an existing student (e.g. new metrics); files stay as they are."""
        self.load_card(card.student_version)  # must exist
        atomic_write_text(self.path(card.student_version) / CARD_FILE, card.model_dump_json(indent=2))

    def load_card(self, version: str) -> StudentCard:
        path = self.path(version) / CARD_FILE
        if not path.exists():
            known = ", ".join(self.versions()) or "none"
            raise FileNotFoundError(f"no student {version!r} under {self.dir} (known: {known})")
        return StudentCard.model_validate_json(path.read_text())

    def load(self, version: str, **load_kwargs: Any) -> Student:
        """Rebuild a saved student after checking its weights against the card."""
        card = self.load_card(version)
        folder = self.path(version)
        got = tensors_digest(folder / WEIGHTS_FILE)
        if got != card.weights_sha256:
            raise StudentIntegrityError(
                f"student {version}: weights sha256 {got[:16]}... differs from its card "
                f"({card.weights_sha256[:16]}...)"
            )
        import student  # noqa: F401  (registers the built-in kinds with Student.load)

        return Student.load(folder, **load_kwargs)

    def versions(self) -> list[str]:
        """Saved versions, oldest first."""
        cards = [(self.load_card(p.parent.name).created_at, p.parent.name)
                 for p in self.dir.glob(f"*/{CARD_FILE}") if not p.parent.name.startswith(".")]
        return [v for _, v in sorted(cards)]

    def delete(self, version: str, release: Callable[[StudentCard], None]) -> StudentCard:
        """Remove a saved student and, through ``release``, what it holds (its durable pin).

        The folder first leaves the registry in one rename (to a hidden name: no longer
        listed, resolved or loadable), then ``release(card)`` runs, then the files go.
        A crash in between leaves the hidden folder and, at worst, a pin that keeps its
        teacher version alive; running the same delete again finishes the job. The
        current student is refused: make another one current first.
        """
        if not _NAME.match(version):
            raise ValueError(f"{version!r} is not a student version")
        trash = self.dir / f"{DELETING}{version}"
        if not trash.exists():
            self.load_card(version)  # raises, listing the known versions
            if self.current_version() == version:
                raise ValueError(f"student {version} is the current student "
                                 f"({self.dir / POINTER_FILE}): distil a new one first")
            os.rename(self.path(version), trash)
            fsync_path(self.dir)
        card = StudentCard.model_validate_json((trash / CARD_FILE).read_text())
        release(card)
        shutil.rmtree(trash)
        return card

    def current_version(self) -> str | None:
        ptr = self.dir / POINTER_FILE
        return json.loads(ptr.read_text())["student_version"] if ptr.exists() else None

    def set_current(self, version: str) -> None:
        self.load_card(version)  # must exist
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / POINTER_FILE, json.dumps({"student_version": version}))

    def resolve(self, spec: str | None) -> str:
        """``None``/``current`` -> the current student; anything else must be a saved version."""
        if spec in (None, "current"):
            current = self.current_version()
            if current is None:
                raise FileNotFoundError(
                    f"no current student under {self.dir}: run `codistill student distill` first"
                )
            return current
        self.load_card(spec)
        return spec


def student_registry(home: str | Path) -> StudentRegistry:
    return StudentRegistry(Path(home) / "students")
