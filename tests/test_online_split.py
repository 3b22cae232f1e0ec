"""The online split (tasks.online): built at small, disjoint from every other set, unlabelled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from codistill.config import Settings, load_settings
from codistill.fsio import sha256_file
from codistill.ids import candidate_id, query_id
from codistill.ranking import RankingExample, read_ranking_file
from tasks import build_dataset
from tasks.build import data_hash
from tasks.dataset import read_guard, read_online, read_split
from tasks.guards import PROSE, guards_hash
from tasks.mine import Pair
from tasks.online import (
    MIN_ONLINE_QUERIES,
    ONLINE_FILE,
    QUERY_CAPS,
    OnlineError,
    OnlineSet,
    build_online,
    unseen,
)
from tasks.packages import (
    GUARD_PINS,
    ONLINE_PINS,
    PINS,
    SMALL_GUARD_STDLIB,
    SMALL_ONLINE_STDLIB,
    SMALL_STDLIB,
)
from tasks.sources import stdlib_root
from tasks.split import SPLITS


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict, Path]:
    """A small build in a fresh home, with an empty wheel cache (to see that nothing is fetched)."""
    home = tmp_path_factory.mktemp("online-home")
    s = load_settings(home=home, data={"size": "small"})
    manifest = build_dataset(s.data, s.data_dir, home / "downloads", progress=False)
    return s, manifest, home / "downloads"


def _others(s: Settings) -> list[RankingExample]:
    """Every list a build writes besides the online split."""
    return [ex for sp in SPLITS for ex in read_split(s, sp)] + read_guard(s, PROSE)


# ---------------------------------------------------------------- pins


def test_online_pins_are_in_no_other_table() -> None:
    names = [p.name for p in ONLINE_PINS]
    assert 3 <= len(names) == len(set(names))
    assert not set(names) & {p.name for p in PINS}  # not training, at any size
    assert not set(names) & {p.name for p in GUARD_PINS}
    assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in ONLINE_PINS)
    modules = set(SMALL_ONLINE_STDLIB)
    assert not modules & set(SMALL_STDLIB) and not modules & set(SMALL_GUARD_STDLIB)
    root = stdlib_root()
    for m in modules:
        assert (root / m).is_dir() or (root / f"{m}.py").is_file(), m


def test_unseen_drops_code_or_queries_of_other_sets() -> None:
    pairs = [Pair(f"Summary number {i}", f"def f{i}():\n    pass\n    pass", f"c{i}", "s", "m",
                  "p.py", f"f{i}", "g", 1) for i in range(4)]
    stats: Counter[str] = Counter()
    kept = unseen(pairs, ["c0"], ["SUMMARY NUMBER 1"], stats)
    assert kept == pairs[2:] and stats == {"seen_code": 1, "seen_summary": 1}


# ---------------------------------------------------------------- the small build


def test_online_file_holds_well_formed_lists(small) -> None:
    s, manifest, downloads = small
    examples = read_online(s)
    assert examples == read_ranking_file(s.data_dir / ONLINE_FILE)
    assert len(examples) == QUERY_CAPS["small"] == manifest["online"]["counts"]["queries"]
    for ex in examples:
        assert len(ex.candidates) == s.data.negatives + 1
        assert ex.labels.count(1) == 1 and set(ex.labels) == {0, 1}
        assert len(set(ex.candidate_ids)) == len(ex.candidate_ids)
        assert ex.candidate_ids == [candidate_id(c) for c in ex.candidates]
        assert ex.query_id == query_id(ex.query)
        assert ex.meta["split"] == "online"
        hard = ex.meta["hard_negative_ids"]
        assert len(hard) <= 16 and ex.candidate_ids[ex.gold_index] not in hard
    assert {ex.meta["group"] for ex in examples} <= {f"stdlib:{m}" for m in SMALL_ONLINE_STDLIB}
    assert not [p for p in downloads.rglob("*") if p.is_file()]  # small downloads nothing


def test_online_shares_no_group_code_or_query_with_other_sets(small) -> None:
    s, manifest, _ = small
    online, others = read_online(s), _others(s)
    groups = {ex.meta["group"] for ex in online}
    assert not groups & {g for sp in SPLITS for g in manifest["groups"][sp]}
    assert not groups & {ex.meta["group"] for ex in others}  # guard groups too
    ids = {c for ex in online for c in ex.candidate_ids}
    train_golds = {ex.candidate_ids[ex.gold_index] for ex in read_split(s, "train")}
    assert not ids & train_golds
    assert not ids & {c for ex in others for c in ex.candidate_ids}
    assert not {ex.query.lower() for ex in online} & {ex.query.lower() for ex in others}
    assert not {ex.query_id for ex in online} & {ex.query_id for ex in others}


def test_manifest_entry_matches_the_file_and_leaves_the_hashes(small, tmp_path, monkeypatch) -> None:
    s, manifest, _ = small
    entry = manifest["online"]
    path = s.data_dir / entry["file"]
    assert entry["file"] == ONLINE_FILE and entry["sha256"] == sha256_file(path)
    examples = read_ranking_file(path)
    assert entry["counts"]["queries"] == len(examples)
    assert entry["counts"]["groups"] == len({ex.meta["group"] for ex in examples})
    assert entry["counts"]["unique_candidates"] == len({c for ex in examples
                                                        for c in ex.candidate_ids})
    [source] = entry["sources"]
    assert source["name"] == "stdlib" and source["modules"] == list(SMALL_ONLINE_STDLIB)
    assert source["pairs"] == len(examples)
    assert entry["mining"]["unseen_pairs"] >= entry["counts"]["pool"] >= len(examples)
    assert manifest["data_hash"] == data_hash(s.data_dir)  # over train, valid, test only
    assert manifest["guards_hash"] == guards_hash(manifest["guards"])
    # the split and guard files are the bytes a build without the online split writes
    monkeypatch.setattr("tasks.build.build_online",
                        lambda *a, **k: OnlineSet([], [], Counter(), []))
    plain = build_dataset(s.data, tmp_path, tmp_path / "downloads", progress=False)
    assert plain["data_hash"] == manifest["data_hash"]
    assert plain["guards"] == manifest["guards"]


def test_precompute_does_not_label_the_online_split(small) -> None:
    from teacher.workflow import precompute_sets

    s, _, _ = small
    sets = precompute_sets(s)
    assert set(sets) == {*SPLITS, f"guard_{PROSE}"}
    online = {ex.query_id for ex in read_online(s)}
    for examples in sets.values():
        assert not {ex.query_id for ex in examples} & online
        assert all(ex.meta["split"] != "online" for ex in examples)


def test_read_online_names_the_build_when_missing(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path, data={"size": "small"})
    with pytest.raises(FileNotFoundError, match="codistill data build --size small"):
        read_online(s)


def test_online_build_refuses_shared_groups_and_too_few_queries(small, monkeypatch) -> None:
    s, _, downloads = small
    with pytest.raises(OnlineError, match="shares groups.*stdlib:email"):
        build_online(s.data, downloads, ["stdlib:email"])
    monkeypatch.setitem(MIN_ONLINE_QUERIES, "small", 10_000)
    with pytest.raises(OnlineError, match=">= 10000 queries"):
        build_online(s.data, downloads, [])
    assert MIN_ONLINE_QUERIES["demo"] >= 300 and MIN_ONLINE_QUERIES["full"] >= 300
