"""Serving bundles: export with its checks, immutability, hashes, no torch in serving."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from codistill.app.export import export_bundle, fuzz_strings
from codistill.config import Settings
from codistill.subwords import Subwords
from serving.bundle import PIN_PREFIX, BundleError, BundleIntegrityError, BundleRegistry
from serving.runtime import OnnxRanker, token_parity, top_order_agrees
from serving.vectors import VectorCache, example_scores
from stores import open_configured_store
from student.asym import StoreCandidates
from student.registry import student_registry
from tasks import dataset as ds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(serving_env) -> tuple[Settings, dict[str, str]]:
    return serving_env


def test_importing_serving_leaves_torch_out() -> None:
    """Every module under serving imports without torch, transformers or the student."""
    code = ("import importlib, pkgutil, sys, serving\n"
            "names = [m.name for m in pkgutil.walk_packages(serving.__path__, 'serving.')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "bad = sorted({k.split('.')[0] for k in sys.modules} & "
            "{'torch', 'transformers', 'sentence_transformers', 'student', 'teacher'})\n"
            "print(len(names), bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.split()
    assert int(out[0]) >= 8 and out[1:] == ["[]"], out


def test_cli_export_checks_publishes_pins_and_is_idempotent(home) -> None:
    from codistill.app.cli import app

    s, students = home
    reg = BundleRegistry(s.bundles_dir)
    before, serving_before = reg.versions(), reg.pointer().serving
    result = CliRunner().invoke(app, ["--home", str(s.home), "-q", "student", "export"],
                                env={"CODISTILL_DATA__SIZE": s.data.size})
    assert result.exit_code == 0, result.output
    version = re.search(r"^bundle (\S+) \(fp32\)", result.stdout, re.M).group(1)
    assert set(reg.versions()) == {*before, version}
    card = reg.verify(version)
    assert card.student_version == students["asym-bow"] and not card.has_candidate_tower
    assert set(card.files) == {"query.onnx", "tokenizer.json", "drift-reference.npy"}
    ref = np.load(reg.path(version) / card.drift["reference"])
    n_train = len({ex.query for ex in ds.read_split(s, "train")})
    want = min(s.serving.export.drift_reference, n_train)
    assert ref.shape == (want, card.embedding_dim) == (card.drift["queries"], card.embedding_dim)
    sizes = reg.file_bytes(version)
    assert set(sizes) == {*card.files, "bundle.json"} and all(n > 0 for n in sizes.values())
    assert f"{sum(sizes.values()):,} bytes" in result.stdout
    assert 0 <= card.drift["oov_share"] < 0.5
    assert card.parity["failures"] == [] and card.parity["max_score_diff"] < 1e-3
    assert card.parity["top10_order_agreement"] == 1.0
    assert card.parity["lists"] == len(ds.read_split(s, "valid"))
    assert card.parity["token_mismatches"] == 0 and card.parity["token_texts"] > 500
    assert reg.pointer().serving == (serving_before or version)  # the first bundle serves
    store = open_configured_store(s)
    try:
        assert PIN_PREFIX + version in store.pins(card.teacher_version)
        again = export_bundle(s, store)  # same student, same bytes: same bundle
    finally:
        store.close()
    assert again.bundle_version == version and set(reg.versions()) == {*before, version}
    assert again.created_at == card.created_at  # immutable: the first card stays


@pytest.mark.parametrize("kind", ["asym-bow", "bow"])
def test_onnx_scores_match_torch_on_held_out_lists(home, kind: str) -> None:
    s, students = home
    store = open_configured_store(s)
    try:
        card = export_bundle(s, store, students[kind])
        reg = BundleRegistry(s.bundles_dir)
        ranker = OnnxRanker.load(reg, card.bundle_version)
        source = StoreCandidates(store, card.teacher_version) if kind == "asym-bow" else None
        model = student_registry(s.home).load(students[kind], candidate_source=source)
        vectors = VectorCache(store, card.teacher_version) if kind == "asym-bow" else None
        for ex in ds.read_split(s, "test"):
            want = model.score(ex.query, ex.candidates, ex.candidate_ids)
            got, fallbacks = example_scores(ranker, vectors, ex)
            assert fallbacks == 0
            np.testing.assert_allclose(got, want, atol=1e-4)
            assert top_order_agrees(want, got)
    finally:
        store.close()
    assert ("candidate" in card.graphs) == (kind == "bow")
    import onnx

    ops = {n.op_type for n in onnx.load(str(reg.path(card.bundle_version) / "query.onnx")).graph.node}
    folded = model.config.out_dim <= model.config.dim  # the projection lives in the table
    assert ("MatMul" not in ops) == folded, ops


def test_int8_bundle_passes_its_own_bounds_and_is_smaller(home) -> None:
    s, students = home
    store = open_configured_store(s)
    try:
        fp32 = export_bundle(s, store, students["bow"])
        int8 = export_bundle(s, store, students["bow"], precision="int8")
    finally:
        store.close()
    reg = BundleRegistry(s.bundles_dir)
    size = {c.precision: (reg.path(c.bundle_version) / "query.onnx").stat().st_size
            for c in (fp32, int8)}
    assert int8.bundle_version != fp32.bundle_version and size["int8"] < size["fp32"] / 2
    assert int8.parity["top10_overlap"] >= s.serving.export.int8_order_agreement


def test_a_failed_parity_check_publishes_nothing(home, monkeypatch: pytest.MonkeyPatch) -> None:
    s, students = home
    reg = BundleRegistry(s.bundles_dir)
    before = reg.versions()
    real = OnnxRanker.embed_queries

    def skewed(self, texts):  # a graph that ranks differently from its torch student
        out = real(self, texts)
        return out[:, ::-1].copy()

    monkeypatch.setattr(OnnxRanker, "embed_queries", skewed)
    store = open_configured_store(s)
    try:
        with pytest.raises(BundleError, match="export refused: max"):
            export_bundle(s, store, students["asym-bow"],
                          cfg=s.serving.export.model_copy(update={"fuzz_strings": 10}))
    finally:
        store.close()
    assert reg.versions() == before
    assert not [p for p in reg.dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_changed_file_or_card_is_refused_at_load(home, tmp_path: Path) -> None:
    import shutil

    s, students = home
    store = open_configured_store(s)
    try:
        card = export_bundle(s, store, students["asym-bow"])
    finally:
        store.close()
    copy = BundleRegistry(tmp_path / "bundles")
    shutil.copytree(s.bundles_dir / card.bundle_version, copy.path(card.bundle_version))
    OnnxRanker.load(copy, card.bundle_version)  # an intact copy loads
    graph = copy.path(card.bundle_version) / "query.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="query.onnx sha256"):
        OnnxRanker.load(copy, card.bundle_version)
    graph.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # restored
    card_path = copy.path(card.bundle_version) / "bundle.json"
    doc = json.loads(card_path.read_text())
    doc["logit_scale"] *= 2
    card_path.write_text(json.dumps(doc))
    with pytest.raises(BundleIntegrityError, match="card was edited"):
        copy.verify(card.bundle_version)


def test_token_parity_finds_a_different_vocabulary(home) -> None:
    s, students = home
    model = student_registry(s.home).load(students["bow"])
    tok = model.tokenizer
    same = Subwords.from_dict(tok.to_dict(), tokenizer_path=tok.wordpiece_path)
    texts = [ex.query for ex in ds.read_split(s, "valid")] + fuzz_strings(200)
    assert token_parity(same, tok, texts, [8, 64]) == []
    state = tok.to_dict()
    state["wordpiece_ids"], state["tokens"] = state["wordpiece_ids"][1:], state["tokens"][1:]
    fewer = Subwords.from_dict(state, tokenizer_path=tok.wordpiece_path)
    assert token_parity(fewer, tok, texts, [64])  # one subword fewer: ids move


def test_top_order_allows_only_near_ties_to_swap() -> None:
    ref = np.array([5.0, 4.0, 4.0 + 5e-6, 3.0, 1.0])
    assert top_order_agrees(ref, np.array([5.0, 3.9, 4.1, 3.0, 1.0]))
    assert not top_order_agrees(ref, np.array([5.0, 4.0, 3.0, 4.1, 1.0]))  # 4.0 vs 3.0
    assert not top_order_agrees(ref, np.array([5.0, 4.0, 3.0, 4.1, 1.0]), k=4, tie_eps=1e-9)
    assert top_order_agrees(ref, ref[::-1].copy(), k=0)


def test_bundle_delete_releases_the_pin_and_refuses_the_serving_bundle(home) -> None:
    from codistill.app.cli import app

    s, students = home
    store = open_configured_store(s)
    try:
        card = export_bundle(s, store, students["bow"], precision="int8")
        assert PIN_PREFIX + card.bundle_version in store.pins(card.teacher_version)
    finally:
        store.close()
    reg = BundleRegistry(s.bundles_dir)
    if reg.pointer().serving is None:
        reg.set_serving(reg.versions()[0])
    runner = CliRunner()
    result = runner.invoke(app, ["--home", str(s.home), "bundle", "delete", card.bundle_version])
    assert result.exit_code == 0, result.output
    assert card.bundle_version not in reg.versions()
    assert not (s.bundles_dir / card.bundle_version).exists()
    store = open_configured_store(s)
    try:
        assert PIN_PREFIX + card.bundle_version not in store.pins(card.teacher_version)
    finally:
        store.close()
    serving = reg.pointer().serving
    result = runner.invoke(app, ["--home", str(s.home), "bundle", "delete", serving])
    assert result.exit_code == 2 and "promote another bundle first" in result.output
    assert serving in reg.versions()
