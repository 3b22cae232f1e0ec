"""The ranking JSONL format: id filling, validation errors naming line and field."""

import json
from pathlib import Path

import pytest

from codistill.ids import candidate_id, normalize_code, query_id
from codistill.ranking import (
    RankingExample,
    RankingFileError,
    read_ranking_file,
    write_ranking_file,
)


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_missing_ids_are_filled_by_hashing(tmp_path: Path) -> None:
    code = "def f(x):\n    return x + 1\n"
    p = _write(tmp_path / "r.jsonl", [{"query": "add one", "candidates": [code, "def g(): pass"], "labels": [1, 0]}])
    (ex,) = read_ranking_file(p)
    assert ex.query_id == query_id("add one")
    assert ex.candidate_ids == [candidate_id(code), candidate_id("def g(): pass")]


def test_candidate_id_ignores_formatting_only_changes() -> None:
    a = "def f(x):\n    return x + 1\n"
    b = "    def f(x):  \n\n        return   x + 1"
    assert normalize_code(a) == normalize_code(b)
    assert candidate_id(a) == candidate_id(b)
    assert candidate_id(a) != candidate_id("def f(x):\n    return x + 2\n")


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ('{"query": "q", "candidates": ["a"], "labels": [1]', "<json>"),
        ({"query": "q", "candidates": ["a", "b"], "labels": [1]}, "labels"),
        ({"query": "q", "candidates": ["a"], "labels": [1], "candidate_ids": ["x", "y"]}, "candidate_ids"),
        ({"query": "", "candidates": ["a"], "labels": [1]}, "query"),
        ({"query": "q", "candidates": [], "labels": []}, "candidates"),
        ({"query": "q", "candidates": ["a"], "labels": [-1]}, "labels"),
        ({"candidates": ["a"], "labels": [1]}, "query"),
        ([1, 2], "<record>"),
    ],
)
def test_malformed_line_names_line_and_field(tmp_path: Path, row: object, field: str) -> None:
    good = {"query": "ok query", "candidates": ["a"], "labels": [1]}
    p = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(RankingFileError) as err:
        read_ranking_file(p)
    assert err.value.line == 2
    assert err.value.field == field
    assert f"bad.jsonl:2: field '{field}'" in str(err.value)


def test_duplicate_query_ids_are_rejected(tmp_path: Path) -> None:
    row = {"query_id": "q1", "query": "q", "candidates": ["a"], "labels": [1]}
    p = _write(tmp_path / "dup.jsonl", [row, row])
    with pytest.raises(RankingFileError, match="duplicate query_id"):
        read_ranking_file(p)


def test_round_trip(tmp_path: Path) -> None:
    ex = RankingExample(query="sort a list", candidates=["def a(): pass", "def b(): pass"], labels=[0, 2],
                        meta={"split": "test"})
    write_ranking_file(tmp_path / "x.jsonl", [ex])
    (back,) = read_ranking_file(tmp_path / "x.jsonl")
    assert back == ex
    assert back.gold_index == 1
