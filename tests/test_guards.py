"""Guard sets (tasks.guards): the miners on fixtures, and the built sets at small and demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codistill.config import DataSettings, load_settings
from codistill.ids import candidate_id, query_id
from codistill.ranking import read_ranking_file
from tasks import build_dataset
from tasks.build import data_hash
from tasks.guards import GUARD_SETS, PROSE, VERSIONS, build_guards, file_name, guards_for
from tasks.packages import (
    GUARD_PINS,
    GUARD_PROSE_PACKAGES,
    GUARD_VERSION_PACKAGES,
    PINS,
    SMALL_GUARD_STDLIB,
    SMALL_STDLIB,
    Pin,
)
from tasks.prose import ProseText, mentions, mine_prose, prose_units
from tasks.sources import dir_files
from tasks.split import SPLITS
from tasks.versions import levenshtein, mine_versions, token_distance

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "fixtures" / "tinypkg"
V2 = ROOT / "tests" / "fixtures" / "tinypkg-2" / "tinypkg"
BOTH = {"guard_sets": list(GUARD_SETS)}


# ---------------------------------------------------------------- miners on fixtures


def test_prose_miner_pairs_usage_prose_with_the_named_function() -> None:
    readme = ProseText("extra:tinypkg", "extra:tinypkg", "doc:README.md", None,
                       "Call ``make_adder()`` whenever you need a tiny incrementing closure.\n\n"
                       "```\nslugify('x')  # code blocks are not prose\n```\n")
    pairs, pool, stats = mine_prose(dir_files(V2), [readme])
    got = {p.name: p.summary for p in pairs}
    assert got == {
        "slugify": "Use slugify() to turn any page title into a short web address part",
        "Tokenizer.split_words":
            "The Tokenizer.split_words helper cuts a string on whitespace and punctuation marks",
        "count_vowels": "count_vowels(word) -- count how many of the letters are vowels",
        "Tokenizer.tokens": "Split text into lowercase word tokens; see Tokenizer.tokens",
        "make_adder": "Call make_adder() whenever you need a tiny incrementing closure",
    }
    assert stats["several_mentions"] == 1  # "Both slugify() and count_vowels() ..." is ambiguous
    for p in pairs:
        assert p.cid == candidate_id(p.code) and '"""' not in p.code.split("\n", 2)[1]
    assert {p.cid for p in pairs} <= {p.cid for p in pool}
    assert len({p.cid for p in pool}) == len(pool) == 6  # every function >= 3 lines, deduped


def test_prose_units_and_mentions() -> None:
    text = "Intro sentence here. Use :func:`pkg.run_all` to run.\n\n- ``a_b(x)`` -- does a\n" \
        "  thing\n- `step` is a word\n\n    indented = code()\n\n>>> f()\n"
    units = list(prose_units(text))
    assert units == ["Intro sentence here.", "Use :func:`pkg.run_all` to run.",
                     "``a_b(x)`` -- does a thing", "`step` is a word"]
    assert [mentions(u) for u in units] == [[], ["pkg.run_all"], ["a_b"], []]


def test_version_miner_keeps_20_to_50_percent_changes() -> None:
    pairs, pool, stats = mine_versions(dir_files(V1), dir_files(V2))
    assert sorted(p.name for p in pairs) == ["Tokenizer.__init__", "slugify"]
    for p in pairs:
        assert 0.2 <= token_distance(p.summary, p.code) <= 0.5
        assert p.module == "tinypkg.text" and p.cid == candidate_id(p.code)
    assert stats["unchanged"] == 2  # count_vowels, Tokenizer.split_words
    assert stats["rejected_too_similar"] == 1  # make_adder lost a nested docstring only
    assert stats["rejected_too_different"] == 1  # Tokenizer.tokens was rewritten
    assert len(pool) == 6


def test_levenshtein_matches_dynamic_programming() -> None:
    import random

    def dp(a: list[str], b: list[str]) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[:], i
            for j, y in enumerate(b, 1):
                row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
        return row[-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        assert levenshtein(a, b) == dp(a, b)


# ---------------------------------------------------------------- pins and settings


def test_guard_pins_are_never_training_pins() -> None:
    training = {p.name for p in PINS}
    assert not {p.name for p in GUARD_PINS} & training
    assert all(len(p.sha256) == 64 for p in GUARD_PINS)
    assert len({(p.name, p.version) for p in GUARD_PINS}) == len(GUARD_PINS)
    pinned = {(p.name, p.version) for p in GUARD_PINS}
    for name, old, new in GUARD_VERSION_PACKAGES:
        assert {(name, old), (name, new)} <= pinned and old != new
    assert set(GUARD_PROSE_PACKAGES) <= {p.name for p in GUARD_PINS}
    assert not set(SMALL_GUARD_STDLIB) & set(SMALL_STDLIB)


def test_default_guard_sets_per_size() -> None:
    assert guards_for(DataSettings(size="small")) == (PROSE,)
    assert guards_for(DataSettings(size="demo")) == GUARD_SETS
    assert guards_for(DataSettings(size="small", **BOTH)) == GUARD_SETS
    assert guards_for(DataSettings(size="demo", guard_sets=[])) == ()


# ---------------------------------------------------------------- built sets


def _check_well_formed(path: Path, name: str, negatives: int = 31) -> list:
    examples = read_ranking_file(path)
    assert examples
    for ex in examples:
        assert len(ex.candidates) == negatives + 1
        assert ex.labels.count(1) == 1 and set(ex.labels) == {0, 1}
        assert len(set(ex.candidate_ids)) == len(ex.candidate_ids)
        assert ex.candidate_ids == [candidate_id(c) for c in ex.candidates]
        assert ex.query_id == query_id(ex.query)
        assert ex.meta["guard"] == name and ex.meta["split"] == f"guard_{name}"
        hard = ex.meta["hard_negative_ids"]
        assert len(hard) <= 16 and ex.candidate_ids[ex.gold_index] not in hard
    return examples


def _training_groups() -> set[str]:
    return {f"pypi:{p.name}" for p in PINS}


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    cache = load_settings().download_dir
    a, b = tmp_path_factory.mktemp("g1"), tmp_path_factory.mktemp("g2")
    first = build_dataset(DataSettings(size="small", **BOTH), a, cache, progress=False)
    second = build_dataset(DataSettings(size="small", **BOTH), b, cache, progress=False)
    return a, first, second


def test_small_guards_are_well_formed_and_disjoint(small_builds) -> None:
    out, manifest, _ = small_builds
    train_groups = {g for s in SPLITS for g in manifest["groups"][s]}
    for name in GUARD_SETS:
        examples = _check_well_formed(out / file_name(name), name)
        groups = {ex.meta["group"] for ex in examples}
        assert not groups & train_groups and not groups & _training_groups()
    prose = read_ranking_file(out / file_name(PROSE))
    assert {ex.meta["group"] for ex in prose} <= {f"stdlib:{m}" for m in SMALL_GUARD_STDLIB}


def test_manifest_carries_guard_hashes_and_rebuild_is_identical(small_builds, tmp_path) -> None:
    out, first, second = small_builds
    from codistill.fsio import sha256_file
    from tasks.guards import guards_hash

    assert set(first["guards"]) == set(GUARD_SETS)
    for name, entry in first["guards"].items():
        assert entry["file"] == file_name(name)
        assert entry["sha256"] == sha256_file(out / entry["file"])
        assert entry["counts"]["queries"] == len(read_ranking_file(out / entry["file"]))
        assert entry["sources"] and all("version" in s for s in entry["sources"])
    assert first["guards_hash"] == guards_hash(first["guards"])
    assert second["guards"] == first["guards"] and second["guards_hash"] == first["guards_hash"]
    assert first["data_hash"] == second["data_hash"] == data_hash(out)
    json.dumps(first)
    # guards leave the split files (and so data_hash) as they were without them
    plain = build_dataset(DataSettings(size="small", guard_sets=[]), tmp_path, tmp_path,
                          progress=False)
    assert plain["data_hash"] == first["data_hash"]
    assert plain["guards"] == {} and plain["guards_hash"] is None
    assert not list(tmp_path.glob("guard_*.jsonl"))


@pytest.fixture(scope="module")
def demo_guards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = load_settings().download_dir / "wheels"
    guards = build_guards(DataSettings(size="demo"), cache, _training_groups())
    out = tmp_path_factory.mktemp("demo_guards")
    from codistill.ranking import write_ranking_file

    for g in guards:
        write_ranking_file(out / file_name(g.name), g.examples)
    return {g.name: (g, out / file_name(g.name)) for g in guards}


def test_demo_guards_have_300_queries_from_guard_pins(demo_guards) -> None:
    guard_sources = {Pin(p.name, p.version, p.sha256).requirement for p in GUARD_PINS}
    for name, (guard, path) in demo_guards.items():
        examples = _check_well_formed(path, name)
        assert len(examples) >= 300, (name, len(examples))
        assert {ex.meta["source"] for ex in examples} <= guard_sources
        assert not {ex.meta["group"] for ex in examples} & _training_groups()
        assert {s["name"] for s in guard.sources} <= {p.name for p in GUARD_PINS}


def test_demo_code2code_pairs_are_near_clones(demo_guards) -> None:
    guard, path = demo_guards[VERSIONS]
    newer = {f"{n}=={new}" for n, _, new in GUARD_VERSION_PACKAGES}
    for ex in read_ranking_file(path):
        gold = ex.candidates[ex.gold_index]
        assert 0.2 <= token_distance(ex.query, gold) <= 0.5
        assert ex.meta["source"] in newer and ex.meta["query_source"] != ex.meta["source"]
        assert gold.split("(", 1)[0].split()[-1] == ex.query.split("(", 1)[0].split()[-1] \
            or "@" in gold.split("\n", 1)[0]  # same function name (decorators aside)


def test_demo_prose_queries_are_prose(demo_guards) -> None:
    _, path = demo_guards[PROSE]
    for ex in read_ranking_file(path):
        assert len(ex.query.split()) >= 4 and len(ex.candidates[ex.gold_index].splitlines()) >= 3
        assert "test" not in ex.meta["path"].split("/")[0].lower()
