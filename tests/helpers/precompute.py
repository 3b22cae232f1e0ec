"""An interrupted-then-resumed precompute, checked the same way on every store backend."""

from __future__ import annotations

import numpy as np
import pytest

from teacher.evaluate import score_examples
from teacher.precompute import precompute
from tests.helpers.code_examples import examples


class Interrupt(Exception):
    pass


def run_interrupted_then_resumed(teacher, store) -> None:
    exs = examples()
    splits = {"train": exs[:3], "test": exs[3:]}

    def boom(stage: str, chunk: int) -> None:
        if stage == "test:labels":  # after the first chunk of test labels was handed to the writer
            raise Interrupt

    with pytest.raises(Interrupt):
        precompute(teacher, store, splits, chunk=2, progress=False, on_chunk=boom)
    info = store.get_version(teacher.version)
    assert info is not None and info.status == "writing"
    assert store.current() is None  # a half-written version is never current
    assert store.has_labels(teacher.version, [e.query_id for e in exs[:3]]).all()
    assert store.has_labels(teacher.version, [e.query_id for e in exs[3:]]).tolist() == [True, True, False]

    stats = precompute(teacher, store, splits, chunk=2, progress=False)
    assert stats.per_split["train"] == {"candidates_written": 0, "queries_written": 0, "queries": 3}
    assert stats.per_split["test"]["queries_written"] == 1  # finished work was not redone
    assert stats.candidates_written == 0
    assert store.current() == teacher.version
    assert store.get_version(teacher.version).status == "complete"

    version, records = store.read_current_labels([e.query_id for e in exs])
    assert version == teacher.version
    expected = score_examples(teacher, exs)
    for ex, rec, cos in zip(exs, records, expected, strict=True):
        assert rec is not None and rec.candidate_ids == ex.candidate_ids
        np.testing.assert_allclose(rec.scores, cos, atol=1e-5)
        assert rec.logit_scale == teacher.logit_scale
        assert rec.soft_labels(1.0).argmax() == ex.gold_index
    ids = exs[0].candidate_ids
    emb, found = store.get_embeddings(teacher.version, ids)
    assert found.all() and emb.shape == (len(ids), teacher.dim)
    np.testing.assert_allclose(emb, teacher.encode(exs[0].candidates), atol=2e-3)  # float16 storage
    assert store.get_texts(ids) == exs[0].candidates
