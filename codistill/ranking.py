"""The ranking-set JSONL format every command reads and writes.

One JSON object per line::

    {"query_id": "q1a2b...",            # optional: filled with ids.query_id(query)
     "query": "return the sum of ...",  # required, non-empty
     "candidates": ["def f(a): ...", ...],      # required, >= 1 code texts
     "candidate_ids": ["c9f8e...", ...],        # optional: filled with ids.candidate_id(code)
     "labels": [1, 0, 0, ...],                  # required graded relevance, ints >= 0
     "meta": {...}}                             # optional, free-form (source, split, ...)

``candidate_ids`` and ``labels`` must be as long as ``candidates``. A file is
validated completely before anything downstream runs, and the first problem is
reported with its line number and field, so a bad file never writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from codistill.fsio import atomic_write_lines
from codistill.ids import candidate_id, query_id


class RankingFileError(ValueError):
    """A ranking file is malformed; names the file, the 1-based line and the field."""

    def __init__(self, path: str | Path, line: int, field: str, message: str) -> None:
        self.path, self.line, self.field = str(path), line, field
        super().__init__(f"{path}:{line}: field '{field}': {message}")


class RankingExample(BaseModel):
    """One query with its candidate list and graded relevance labels."""

    model_config = ConfigDict(extra="ignore")

    query_id: str = ""
    query: str = Field(min_length=1)
    candidates: list[str] = Field(min_length=1)
    candidate_ids: list[str] = Field(default_factory=list)
    labels: list[int]
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fill_and_check(self) -> RankingExample:
        if not self.query.strip():
            raise ValueError("query: must not be blank")
        if len(self.labels) != len(self.candidates):
            raise ValueError(
                f"labels: has {len(self.labels)} entries but candidates has {len(self.candidates)}"
            )
        if any(lab < 0 for lab in self.labels):
            raise ValueError("labels: relevance grades must be >= 0")
        if not self.query_id:
            self.query_id = query_id(self.query)
        if not self.candidate_ids:
            self.candidate_ids = [candidate_id(c) for c in self.candidates]
        elif len(self.candidate_ids) != len(self.candidates):
            raise ValueError(
                f"candidate_ids: has {len(self.candidate_ids)} entries "
                f"but candidates has {len(self.candidates)}"
            )
        return self

    @property
    def gold_index(self) -> int:
        """Index of the most relevant candidate (first on ties)."""
        return max(range(len(self.labels)), key=lambda i: (self.labels[i], -i))


def _field_of(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or ""
    msg = first.get("msg", str(err))
    # model-level validators report "field: message" in their text
    if not loc and ": " in msg:
        text = msg.removeprefix("Value error, ")
        field, _, rest = text.partition(": ")
        return field, rest
    return loc or "<record>", msg


def parse_line(line: str, path: str | Path, lineno: int) -> RankingExample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RankingFileError(path, lineno, "<json>", f"invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise RankingFileError(path, lineno, "<record>", "each line must be a JSON object")
    try:
        return RankingExample.model_validate(obj)
    except ValidationError as exc:
        field, msg = _field_of(exc)
        raise RankingFileError(path, lineno, field, msg) from None


def iter_ranking_file(path: str | Path) -> Iterator[RankingExample]:
    """Yield examples lazily; raises RankingFileError on the first bad line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield parse_line(line, path, lineno)


def read_ranking_file(path: str | Path) -> list[RankingExample]:
    """Read and fully validate a ranking file (nothing is returned if any line is bad)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ranking file not found: {path}")
    examples = list(iter_ranking_file(path))
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.query_id in seen:
            raise RankingFileError(
                path, i + 1, "query_id", f"duplicate query_id {ex.query_id!r} (first at record {seen[ex.query_id] + 1})"
            )
        seen[ex.query_id] = i
    if not examples:
        raise RankingFileError(path, 1, "<file>", "file holds no ranking records")
    return examples


def write_ranking_file(path: str | Path, examples: Iterable[RankingExample]) -> int:
    """Write examples atomically and durably (:mod:`codistill.fsio`); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_lines(path, (ex.model_dump_json() + "\n" for ex in examples))
