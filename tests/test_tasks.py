"""Tests of the data-set builder: mining rules, group splits, candidates, build."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import bm25s
import numpy as np
import pytest

from codistill.config import DataSettings
from codistill.fsio import sha256_file
from codistill.ids import candidate_id, query_id
from codistill.ranking import read_ranking_file
from codistill.text import subword_tokens
from tasks import DatasetError, build_dataset, load_manifest, load_split
from tasks.build import _check_sizes, data_hash
from tasks.mine import Pair, extract, mine, reject_summary, summarize
from tasks.negatives import bm25_hard_negatives, build_examples
from tasks.packages import PINS, SMALL_STDLIB, Pin, pins_for
from tasks.sources import SourceFile, dir_files, is_skipped, stdlib_files, wheel_files
from tasks.split import SPLITS, assign_groups, cap_queries, split_pairs
from tasks.wheels import WheelError, fetch_wheels

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tinypkg"


# ---------------------------------------------------------------- mining rules


@pytest.fixture(scope="module")
def fixture_pairs() -> dict[str, Pair]:
    result = mine(dir_files(FIXTURE))
    pairs = {p.name: p for p in result.pairs}
    assert len(pairs) == len(result.pairs), "qualified names are unique in the fixture"
    return pairs


@pytest.mark.parametrize(
    ("docstring", "summary"),
    [
        ("Turn a title into a slug.\n\nMore text here.", "Turn a title into a slug"),
        ("Count vowels. Results are cached.", "Count vowels"),
        ("Parse the   header\n    line of a file.", "Parse the header line of a file"),
        ("Use e.g. the default value. Then stop.", "Use e.g. the default value"),
        ("Return :func:`~os.path.join` of ``a`` and `b`.", "Return os.path.join of a and b"),
        ("Does it work?  Yes.", "Does it work?"),
        ("Example usage:\n\n>>> f()", "Example usage"),
    ],
)
def test_summarize(docstring: str, summary: str) -> None:
    assert summarize(docstring) == summary


@pytest.mark.parametrize(
    ("summary", "reason"),
    [
        ("Return the sum", None),
        ("Return sum", "short_summary"),
        (":param x: the value to add", "param_doc"),
        ("Args: x (int): the value", "param_doc"),
        ("Read the page at https://example.com now", "url"),
        ("TODO: write this function properly", "todo"),
        ("Deprecated alias of the parse function", "no_summary"),
        ("See the parse function for details", "no_summary"),
        ("f(x, y) -> int", "signature"),
    ],
)
def test_reject_summary(summary: str, reason: str | None) -> None:
    assert reject_summary(summary) == reason


def test_fixture_pairs_are_the_documented_library_functions(fixture_pairs: dict[str, Pair]) -> None:
    assert set(fixture_pairs) == {
        "count_vowels", "upper_words", "slugify", "make_adder", "Tokenizer.__init__",
        "Tokenizer.split_words", "Tokenizer.tokens", "Tokenizer.usage",
        "Tokenizer.Options.describe",
    }
    slug = fixture_pairs["slugify"]
    assert slug.summary == "Turn a title into a URL-safe slug"
    assert (slug.source, slug.group) == ("extra:tinypkg", "extra:tinypkg")
    assert slug.module == "tinypkg.text"
    assert slug.path == "text.py" and slug.lineno == 9


def test_docstring_removed_and_code_dedented(fixture_pairs: dict[str, Pair]) -> None:
    for pair in fixture_pairs.values():
        assert '"""' + pair.summary not in pair.code
        assert pair.code.startswith(("def ", "@")), pair.code
        assert pair.cid == candidate_id(pair.code)
    assert fixture_pairs["slugify"].code == (
        'def slugify(title, sep="-"):\n'
        "    words = _NON_WORD.split(title.lower())\n"
        "    words = [w for w in words if w]\n"
        "    return sep.join(words)"
    )
    # the blank line after a docstring goes with it
    assert fixture_pairs["Tokenizer.tokens"].code.splitlines()[1] == "    self.calls += 1"
    # a string literal at column 0 inside a method does not block the dedent
    assert fixture_pairs["Tokenizer.usage"].code == (
        'def usage(self):\n    text = """\nusage: tiny [options] FILE\n"""\n    return text.strip()'
    )


def test_decorators_methods_and_nesting(fixture_pairs: dict[str, Pair]) -> None:
    assert fixture_pairs["Tokenizer.split_words"].code.startswith("@staticmethod\ndef split_words(")
    assert fixture_pairs["count_vowels"].code.startswith("@functools.lru_cache(maxsize=128)\ndef ")
    assert fixture_pairs["Tokenizer.Options.describe"].code.startswith("def describe(self):")
    # a function nested in a function is part of its parent, not a pair of its own
    assert "inner" not in fixture_pairs
    assert "def inner(x):" in fixture_pairs["make_adder"].code


def test_filters_and_dedupe_counts() -> None:
    result = mine(dir_files(FIXTURE))
    stats = result.stats
    assert stats["files"] == 3  # testing.py and tests/ are skipped before parsing
    assert stats["rejected_short_code"] == 1  # shout
    assert stats["rejected_param_doc"] == 1  # wrap_lines
    assert stats["rejected_url"] == 1  # fetch_readme
    assert stats["rejected_todo"] == 1  # normalize
    assert stats["rejected_test_function"] == 1  # test_slugify_roundtrip
    assert stats["rejected_dunder"] == 1  # __repr__
    assert stats["duplicate_code"] == 1  # count_vowels copied in compat.py and text.py
    assert stats["duplicate_summary"] == 1  # shout_words reuses upper_words' summary
    kept = {p.name: p for p in result.pairs}
    assert kept["count_vowels"].module == "tinypkg.compat"  # first in sorted path order
    assert "shout_words" not in kept


def test_skipped_paths() -> None:
    assert is_skipped("pkg/tests/helpers.py")
    assert is_skipped("pkg/test_io.py")
    assert is_skipped("pkg/testing.py")
    assert is_skipped("pkg/_vendor/six.py")
    assert is_skipped("pkg-1.0.dist-info/RECORD")
    assert not is_skipped("pkg/contest.py")
    assert not is_skipped("pkg/io.py")


def test_unparsable_file_is_skipped() -> None:
    good = SourceFile("x", "a.py", "a", "g", "def f(a):\n    '''Add one to the value.'''\n"
                      "    b = a + 1\n    return b\n")
    bad = SourceFile("x", "b.py", "b", "g", "def broken(:\n    pass\n")
    result = mine([bad, good])
    assert result.stats["unparsable_files"] == 1
    assert [p.name for p in result.pairs] == ["f"]


def test_wheel_files_read_from_zip(tmp_path: Path) -> None:
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "")
        zf.writestr("demo_pkg/core.py", "def f():\n    return 1\n")
        zf.writestr("demo_pkg/tests/test_core.py", "def test_f():\n    pass\n")
        zf.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\n")
    files = list(wheel_files(wheel, Pin("demo-pkg", "1.0", "0" * 64)))
    assert [(f.path, f.module, f.group, f.source) for f in files] == [
        ("demo_pkg/__init__.py", "demo_pkg", "pypi:demo-pkg", "demo-pkg==1.0"),
        ("demo_pkg/core.py", "demo_pkg.core", "pypi:demo-pkg", "demo-pkg==1.0"),
    ]


def test_plain_folder_gives_one_group_per_top_level_module(tmp_path: Path) -> None:
    (tmp_path / "alpha.py").write_text("x = 1\n")
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "__init__.py").write_text("")
    (tmp_path / "beta" / "io.py").write_text("y = 2\n")
    files = list(dir_files(tmp_path))
    assert [(f.module, f.group) for f in files] == [
        ("alpha", "extra:alpha"), ("beta", "extra:beta"), ("beta.io", "extra:beta"),
    ]


def test_missing_extra_source_fails_before_building(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        build_dataset(DataSettings(size="small"), tmp_path, tmp_path, [tmp_path / "nope"], False)


# ---------------------------------------------------------------- wheels and pins


def test_pins_are_consistent() -> None:
    assert len(PINS) >= 150 and len({p.name for p in PINS}) == len(PINS)
    assert all(len(p.sha256) == 64 for p in PINS)
    assert pins_for("small") == () and len(pins_for("demo")) == 8
    assert len(SMALL_STDLIB) == 30


def test_fetch_wheels_uses_cache_and_checks_hash(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a zip")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    calls: list[object] = []
    monkeypatch.setattr("tasks.wheels._pip_download", lambda *a: calls.append(a))
    assert fetch_wheels([Pin("demo-pkg", "1.0", sha)], tmp_path) == {"demo-pkg": wheel}
    assert calls == []  # cached and verified: no download
    with pytest.raises(WheelError, match="sha256"):
        fetch_wheels([Pin("demo-pkg", "1.0", "f" * 64)], tmp_path)
    assert len(calls) == 1  # a mismatching cache file triggers a download, which must match


# ---------------------------------------------------------------- splits


def _pairs(groups: dict[str, int]) -> list[Pair]:
    return [
        Pair(f"summary {g} {i} text", f"def f_{i}():\n    pass\n    pass", f"c{g}{i}", "s",
             "m", "p.py", f"f_{i}", g, 1)
        for g, n in groups.items() for i in range(n)
    ]


def test_split_is_disjoint_by_group_and_seeded() -> None:
    rng = random.Random(0)
    counts = {f"g{i}": rng.randint(1, 30) for i in range(80)}
    pairs = _pairs(counts)
    splits = split_pairs(pairs, seed=0, valid_fraction=0.15, test_fraction=0.15)
    groups = {s: {p.group for p in splits[s]} for s in SPLITS}
    assert not groups["train"] & groups["valid"]
    assert not groups["train"] & groups["test"]
    assert not groups["valid"] & groups["test"]
    assert sum(len(v) for v in splits.values()) == len(pairs)
    total = len(pairs)
    for s in ("valid", "test"):
        assert 0.12 * total <= len(splits[s]) <= 0.18 * total, (s, len(splits[s]))
    again = assign_groups(counts, 0, 0.15, 0.15)
    assert again == assign_groups(dict(reversed(list(counts.items()))), 0, 0.15, 0.15)
    assert again != assign_groups(counts, 1, 0.15, 0.15)


def test_huge_group_does_not_swallow_a_held_out_split() -> None:
    counts = {"huge": 1000, **{f"g{i}": 10 for i in range(100)}}
    for seed in range(5):
        assert assign_groups(counts, seed, 0.15, 0.15)["huge"] == "train"


def test_cap_queries_is_seeded_subsample_in_order() -> None:
    pairs = _pairs({"a": 50})
    capped = cap_queries(pairs, 10, seed=3, split="test")
    assert len(capped) == 10 and capped == cap_queries(pairs, 10, seed=3, split="test")
    assert capped == sorted(capped, key=pairs.index)
    assert capped != cap_queries(pairs, 10, seed=4, split="test")
    assert cap_queries(pairs, None, 0, "train") == pairs


def test_demo_needs_300_held_out_queries() -> None:
    pools = {s: _pairs({s: 400}) for s in SPLITS}
    queries = dict(pools, test=pools["test"][:299])
    with pytest.raises(DatasetError, match=">= 300 test queries"):
        _check_sizes(DataSettings(size="demo"), queries, pools)
    _check_sizes(DataSettings(size="small"), queries, pools)  # no floor for small


# ---------------------------------------------------------------- candidates


def test_subword_tokens() -> None:
    assert subword_tokens("def parseHTTPHeader_v2(self, raw_bytes): return x") == [
        "def", "parse", "http", "header", "v2", "self", "raw", "bytes", "return",
    ]


def test_build_examples_small_pool_uses_all_it_has() -> None:
    pool = [p for p in mine(dir_files(FIXTURE)).pairs]
    examples = build_examples(pool[:2], pool, "test", negatives=31, hard_fraction=0.5, seed=0)
    for ex in examples:
        assert len(ex.candidates) == len(pool)  # gold + every other pool function, once
        assert sorted(ex.candidate_ids) == sorted(p.cid for p in pool)


def test_bm25_hits_are_bm25s_top_hits() -> None:
    pool = mine(stdlib_files(["json", "heapq", "fractions", "base64", "textwrap"])).pairs
    hits = bm25_hard_negatives(pool, pool, 5)
    reference = bm25s.BM25()
    reference.index([subword_tokens(p.code) for p in pool], show_progress=False)
    for i, (query, found) in enumerate(zip(pool, hits, strict=True)):
        scores = reference.get_scores(subword_tokens(query.summary) or ["<none>"])
        scores[i] = -1.0  # the gold is never its own hard negative
        assert i not in found and len(found) == min(5, int((scores > 0).sum()))
        best = np.sort(scores)[::-1][: len(found)]
        assert np.allclose(np.sort(scores[found])[::-1], best, rtol=1e-5), query.summary


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small")
    manifest = build_dataset(
        DataSettings(size="small"), out, out / "cache", extra_sources=[FIXTURE], progress=False
    )
    return out, manifest


def test_candidate_lists(small_build: tuple[Path, dict]) -> None:
    out, manifest = small_build
    gold_positions = []
    for split in SPLITS:
        for ex in load_split(out, split):
            assert len(ex.candidates) == 32
            assert ex.labels.count(1) == 1 and set(ex.labels) == {0, 1}
            assert len(set(ex.candidate_ids)) == len(ex.candidate_ids)
            assert ex.candidate_ids == [candidate_id(c) for c in ex.candidates]
            assert ex.query_id == query_id(ex.query)
            hard = ex.meta["hard_negative_ids"]
            gold = ex.candidate_ids[ex.gold_index]
            assert len(hard) <= 16 and gold not in hard and set(hard) <= set(ex.candidate_ids)
            assert ex.meta["split"] == split
            assert {"source", "module", "name", "group"} <= set(ex.meta)
            gold_positions.append(ex.gold_index)
    assert len(set(gold_positions)) > 10  # shuffled: gold is not always first


def test_splits_share_no_group_and_no_candidate(small_build: tuple[Path, dict]) -> None:
    out, manifest = small_build
    groups = {s: set(manifest["groups"][s]) for s in SPLITS}
    cands: dict[str, set[str]] = {}
    for split in SPLITS:
        examples = load_split(out, split)
        assert {ex.meta["group"] for ex in examples} <= groups[split]
        cands[split] = {c for ex in examples for c in ex.candidate_ids}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not groups[a] & groups[b]
        assert not cands[a] & cands[b], "negatives must come from the query's own split"


def test_hard_negatives_come_from_bm25(small_build: tuple[Path, dict]) -> None:
    out, _ = small_build
    hard_overlap, random_overlap, n_hard = [], [], []
    for ex in load_split(out, "train"):
        q = set(subword_tokens(ex.query))
        hard = set(ex.meta["hard_negative_ids"])
        n_hard.append(len(hard))
        for cid, code, label in zip(ex.candidate_ids, ex.candidates, ex.labels, strict=True):
            if label:
                continue
            overlap = len(q & set(subword_tokens(code))) / max(1, len(q))
            (hard_overlap if cid in hard else random_overlap).append(overlap)
    mean_hard = sum(hard_overlap) / len(hard_overlap)
    mean_random = sum(random_overlap) / len(random_overlap)
    assert mean_hard > 1.5 * mean_random, (mean_hard, mean_random)
    # round(31 * 0.5) = 16 BM25 hits for nearly every query (fewer only without shared words)
    assert sum(n == 16 for n in n_hard) >= 0.9 * len(n_hard)


def test_manifest(small_build: tuple[Path, dict]) -> None:
    out, manifest = small_build
    assert load_manifest(out) == manifest
    assert manifest["size"] == "small" and manifest["seed"] == 0 and manifest["negatives"] == 31
    assert manifest["python"]["implementation"] and manifest["python"]["version"]
    names = [s["name"] for s in manifest["sources"]]
    assert names == ["stdlib", "extra:tinypkg"]
    assert manifest["sources"][0]["sha256"] == "stdlib"
    assert manifest["sources"][1]["pairs"] == 9
    for split in SPLITS:
        counts = manifest["counts"][split]
        examples = load_split(out, split)
        assert counts["queries"] == len(examples)
        assert counts["unique_candidates"] == len({c for ex in examples for c in ex.candidate_ids})
        assert counts["groups"] == len(manifest["groups"][split])
    assert manifest["counts"]["train"]["queries"] == 200
    assert manifest["counts"]["valid"]["queries"] == manifest["counts"]["test"]["queries"] == 60
    assert manifest["data_hash"] == data_hash(out)
    assert manifest["build_seconds"] > 0
    json.dumps(manifest)


def test_unlabeled_text_comes_from_train_groups_and_leaks_nothing(
    small_build: tuple[Path, dict],
) -> None:
    """unlabeled.jsonl: train groups only, no text of another set, every kind, seeded counts."""
    from tasks.guards import file_name
    from tasks.online import ONLINE_FILE
    from tasks.unlabeled import KINDS, UNLABELED_FILE, read_unlabeled

    out, manifest = small_build
    texts = read_unlabeled(out / UNLABELED_FILE)
    entry = manifest["unlabeled"]
    assert entry["texts"] == len(texts) > 100 and entry["sha256"] == sha256_file(
        out / UNLABELED_FILE)
    assert {t.kind for t in texts} == set(KINDS)
    for kind in KINDS:
        assert entry["mining"][f"kept_{kind}"] == sum(t.kind == kind for t in texts)
    train_groups = set(manifest["groups"]["train"])
    assert {t.group for t in texts} <= train_groups | {"train"}
    held = [ex for s in SPLITS for ex in load_split(out, s)]
    held += [ex for g in manifest["guards"] for ex in read_ranking_file(out / file_name(g))]
    held += read_ranking_file(out / ONLINE_FILE)
    others = {t.strip() for ex in held for t in (ex.query, *ex.candidates)}
    assert not others & {t.text.strip() for t in texts}
    assert len({t.text for t in texts}) == len(texts)
    train_queries = {ex.query for ex in load_split(out, "train")}
    summaries = [t.text for t in texts if t.kind == "summary"]
    assert summaries and not set(summaries) & train_queries  # the cap's left-overs only


def test_rebuild_gives_same_data_hash(small_build: tuple[Path, dict], tmp_path: Path) -> None:
    _, first = small_build
    second = build_dataset(
        DataSettings(size="small"), tmp_path, tmp_path / "cache", extra_sources=[FIXTURE],
        progress=False,
    )
    assert second["data_hash"] == first["data_hash"]
    other_seed = build_dataset(
        DataSettings(size="small", seed=1), tmp_path / "s1", tmp_path / "cache",
        extra_sources=[FIXTURE], progress=False,
    )
    assert other_seed["data_hash"] != first["data_hash"]


def test_data_hash_does_not_depend_on_hash_seed(
    small_build: tuple[Path, dict], tmp_path: Path
) -> None:
    """A fresh interpreter with another PYTHONHASHSEED must write the same bytes."""
    code = (
        "import sys; from pathlib import Path; from codistill.config import DataSettings; "
        "from tasks import build_dataset; "
        "m = build_dataset(DataSettings(size='small'), Path(sys.argv[1]), Path(sys.argv[1]), "
        "extra_sources=[Path(sys.argv[2])], progress=False); print(m['data_hash'])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(FIXTURE)], env=env, cwd=ROOT,
        capture_output=True, text=True, check=True,
    )
    assert proc.stdout.strip() == small_build[1]["data_hash"]


def test_load_split_rejects_unknown_split(small_build: tuple[Path, dict]) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(small_build[0], "dev")  # type: ignore[arg-type]


def test_extract_keeps_async_functions() -> None:
    text = "async def fetch(url):\n    '''Fetch the page body.'''\n    r = await get(url)\n" \
        "    body = await r.text()\n    return body\n"
    [pair] = extract(SourceFile("x", "a.py", "a", "g", text))
    assert pair.code.startswith("async def fetch(url):") and "Fetch" not in pair.code
