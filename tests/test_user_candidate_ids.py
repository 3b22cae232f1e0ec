"""User-supplied ``candidate_ids`` work end to end: distill, ``student evaluate``, online.

The ranking format lets a user name candidates (``"cand-0001"``, ``"my/lib.py::f"``)
instead of taking the content hash. ``teacher precompute`` stores the embeddings
under those names, so everything that reads them back must ask by *id*: a student
without a candidate tower that re-hashed the texts would find nothing in the store.

One module-scoped home: the ``small`` data set cut to 40 / 12 / 12 queries with 8
candidates each, every candidate renamed, precomputed with the real zero-shot MiniLM
teacher reading 64 subwords (~10-20 s on a loaded 2-core machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from codistill.config import DistillConfig, Settings, load_settings
from codistill.ids import candidate_id
from codistill.ranking import RankingExample, write_ranking_file
from stores import open_configured_store
from streaming.events import Feedback, Impression
from streaming.join import JoinedImpression
from student.asym import AsymmetricBowStudent, MissingCandidateError, StoreCandidates
from student.bow import BowConfig
from student.build import build_student
from student.distill import distill
from student.evaluation import student_scores
from student.online import JoinedBatch, OnlineLearner
from student.tokenizer import SubwordTokenizer
from tasks import dataset as ds
from teacher import workflow as wf
from tests.helpers.data import build_data

SIZES = {"train": 40, "valid": 12, "test": 12}
PER_LIST = 8
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _user_id(n: int) -> str:
    """Two styles a user might pick; neither looks like ``c`` + 16 hex digits."""
    return f"cand-{n:04d}" if n % 2 else f"my/lib_{n}.py::f"


def _rename(splits: dict[str, list[RankingExample]]) -> dict[str, list[RankingExample]]:
    """Each split cut to ``SIZES`` lists of ``PER_LIST`` (gold kept); one user id per text."""
    names: dict[str, str] = {}
    out: dict[str, list[RankingExample]] = {}
    for sp, examples in splits.items():
        out[sp] = []
        for ex in examples[: SIZES[sp]]:
            keep = [ex.gold_index, *(i for i in range(len(ex.candidates)) if i != ex.gold_index)]
            keep = list(dict.fromkeys(keep, None))[:PER_LIST]
            texts = [ex.candidates[i] for i in keep]
            for t in texts:
                names.setdefault(t, _user_id(len(names)))
            out[sp].append(ex.model_copy(update={
                "candidates": texts, "candidate_ids": [names[t] for t in texts],
                "labels": [ex.labels[i] for i in keep]}))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = load_settings(home=tmp_path_factory.mktemp("user-ids-home"), data={"size": "small"},
                      teacher={"max_seq_length": 64})
    build_data(s)
    splits = _rename({sp: ds.read_split(s, sp) for sp in ds.SPLITS})
    for sp, examples in splits.items():
        write_ranking_file(s.data_dir / f"{sp}.jsonl", examples)
    first = splits["train"][0]
    assert all(cid != candidate_id(t) for cid, t in zip(first.candidate_ids, first.candidates,
                                                         strict=True))
    version = wf.ensure_current(s)
    wf.precompute_version(s, version, {sp: ds.read_split(s, sp) for sp in ds.SPLITS}, False)
    return s


@pytest.mark.parametrize("init", ["random", "teacher"])
def test_distill_and_cli_evaluate_on_user_ids(home: Settings, init: str) -> None:
    from codistill.app.cli import app

    cfg = DistillConfig(epochs=2, init=init, measure_speed=False)
    summary = distill(home, cfg, progress=False, set_current=True)
    for sp in ("valid", "test"):
        m = summary["results"]["student"][sp]
        assert m["n_queries"] == SIZES[sp] and 0.0 < m["mrr@10"] <= 1.0
        assert np.isfinite(m["teacher_kl"])
    result = CliRunner().invoke(app, ["--home", str(home.home), "student", "evaluate",
                                      "--data", str(home.data_dir / "test.jsonl")])
    assert result.exit_code == 0, result.output


def test_asym_student_scores_by_id_and_texts_alone_miss(home: Settings) -> None:
    """Ids given: the stored vectors of exactly those ids; texts alone fall back to hashes."""
    train = ds.read_split(home, "train")
    store = open_configured_store(home)
    try:
        version = store.current()
        assert version is not None
        source = StoreCandidates(store, version)
        student = build_student(train, version, DistillConfig(init="random"),
                                candidate_source=source).eval()
        ex = train[0]
        q = student.encode_queries([ex.query])
        want = student.score_embeddings(q, source.embed_ids(ex.candidate_ids))[0].detach()
        got = student.score(ex.query, ex.candidates, candidate_ids=ex.candidate_ids)
        assert np.array_equal(got, want.numpy())
        assert np.array_equal(student_scores(student, [ex])[0], got)
        with pytest.raises(MissingCandidateError, match="precompute"):
            student.score(ex.query, ex.candidates)  # content hashes: not what was stored
    finally:
        store.close()


def test_online_learner_steps_on_user_ids(home: Settings) -> None:
    """An asym-bow learner over the store takes a step on impressions naming user ids."""
    train = ds.read_split(home, "train")
    store = open_configured_store(home)
    try:
        version = store.current()
        info = store.get_version(version) if version else None
        assert version is not None and info is not None
        student = build_student(train, version, DistillConfig(init="random"),
                                init_scale=info.logit_scale, teacher_dim=info.dim,
                                candidate_source=StoreCandidates(store, version))
        learner = OnlineLearner(student, lr=1e-3, alpha=0.5)
        ready = []
        for n, ex in enumerate(train[:8]):
            shown = ex.candidate_ids[::-1]  # a reordered display
            imp = Impression(request_id=f"r{n}", query_id=ex.query_id, query=ex.query,
                             candidate_ids=shown, model_version="m", event_time=T0)
            click = [Feedback(request_id=f"r{n}", candidate_id=shown[0], action="click",
                              position=1, event_time=T0 + timedelta(seconds=1))]
            ready.append(JoinedImpression(imp, click if n % 2 else []))
        batch = JoinedBatch.fetch(ready, lambda qids: store.get_labels(version, qids),
                                  store.get_texts)
        before = {k: v.detach().clone() for k, v in student.state_dict().items()}
        stats = learner.learn_many(batch)
        assert stats.batch.label_hits == 8 and stats.batch.text_misses == 0
        assert stats.stepped and stats.loss is not None and np.isfinite(stats.loss)
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        ex = train[0]
        scores = learner.score(ex.query, ex.candidates, candidate_ids=ex.candidate_ids)
        assert scores.shape == (PER_LIST,) and np.isfinite(scores).all()
    finally:
        store.close()


class _HashSource:
    """A source over a table keyed by content id: ``embed`` hashes, ``embed_ids`` looks up."""

    def __init__(self, codes: Sequence[str], dim: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.table = {candidate_id(c): torch.randn(dim, generator=gen) for c in codes}

    def embed(self, texts: Sequence[str]) -> Tensor:
        return self.embed_ids([candidate_id(t) for t in texts])

    def embed_ids(self, ids: Sequence[str]) -> Tensor:
        return torch.stack([self.table[i] for i in ids]) if ids else torch.zeros(0, 8)


def test_content_hash_ids_give_bit_identical_scores() -> None:
    """With content-hash ids, scoring by id and by text is the same computation."""
    codes = [f"def f{i}(x):\n    return x + {i}" for i in range(6)]
    spaced = ["\n".join(f"  {line}  " for line in codes[0].split("\n"))]  # same id, new text
    tokenizer = SubwordTokenizer(max_vocab=128, oov_buckets=2).fit(["add one", *codes])
    torch.manual_seed(0)
    model = AsymmetricBowStudent(tokenizer, "t", BowConfig(dim=8, out_dim=8),
                                 candidate_source=_HashSource(codes)).eval()
    lists = [codes[:4], [*codes[2:], *spaced], codes[1:2]]
    ids = [[candidate_id(c) for c in cands] for cands in lists]
    by_text = model.forward_scores(["add one", "plus two", "x"], lists)
    by_id = model.forward_scores(["add one", "plus two", "x"], lists, candidate_ids=ids)
    assert torch.equal(by_text.scores, by_id.scores) and torch.equal(by_text.mask, by_id.mask)
    for cands, cids in zip(lists, ids, strict=True):
        assert np.array_equal(model.score("add one", cands),
                              model.score("add one", cands, candidate_ids=cids))
    examples = [RankingExample(query="add one", candidates=c, labels=[1] + [0] * (len(c) - 1))
                for c in lists]
    assert examples[1].candidate_ids == ids[1]  # the format's default ids: content hashes
    with torch.no_grad():  # what student_scores computed before ids were passed: texts only
        position = {t: i for i, t in enumerate(dict.fromkeys(c for x in lists for c in x))}
        q, c = model.encode_queries(["add one"] * 3), model.encode_candidates(list(position))
        before = [model.score_embeddings(q[i : i + 1], c[[position[t] for t in x]])[0].numpy()
                  for i, x in enumerate(lists)]
    for old, new in zip(before, student_scores(model, examples), strict=True):
        assert np.array_equal(old, new)
