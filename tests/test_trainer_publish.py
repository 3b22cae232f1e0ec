"""The online trainer publishes checked serving bundles from its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from serving.bundle import BundleRegistry
from serving.runtime import OnnxRanker
from streaming import open_stream
from streaming.generator import ClickModel
from student.registry import student_registry
from tasks import dataset as ds
from tests.helpers.online import SMALL, biased_click_messages


def test_student_online_publishes_bundles_every_n_batches_and_at_the_end(serving_env,
                                                                        tmp_path: Path):
    from codistill.app.cli import app

    s, _ = serving_env
    events = tmp_path / "events"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"size": s.data.size}, "stream": {"path": str(events), "partitions": 2},
        "online": {"name": "pub", "batch_size": 16, "checkpoint_every": 1, "until_end": True,
                   **SMALL}}))
    stream = open_stream(s.stream.model_copy(update={"path": events, "partitions": 2}))
    try:
        stream.ensure_topics()
        for key, value in biased_click_messages(ds.read_split(s, "train"), 120, seed=3,
                                                click_model=ClickModel(), max_shown=8):
            stream.send(s.stream.topic, key, value)
        stream.flush()
    finally:
        stream.close()
    before = set(BundleRegistry(s.bundles_dir).versions())
    result = CliRunner().invoke(app, ["--config", str(config), "--home", str(s.home), "-q",
                                      "student", "online", "--publish-every", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    published = summary["bundles"]
    batches = summary["batches"]
    assert batches >= 7, summary
    # one bundle per 3 batches (checkpoints every batch), plus the final one
    assert [b["batches"] for b in published] == [*range(3, batches, 3), batches]
    reg = BundleRegistry(s.bundles_dir)
    assert {b["bundle_version"] for b in published} == set(reg.versions()) - before
    last = reg.verify(published[-1]["bundle_version"])
    assert last.source["trainer"] == "pub" and last.source["batches"] == batches
    assert last.parity["failures"] == [] and "mrr@10" in last.metrics["valid (onnx)"]
    assert last.has_candidate_tower  # a trainer from scratch: a BowStudent, both towers
    # the bundle is the checkpoint's student: same scores as the registry copy of it
    model = student_registry(s.home).load(last.source["student_version"])
    ranker = OnnxRanker.load(reg, last.bundle_version)
    ex = ds.read_split(s, "test")[0]
    want = model.score(ex.query, ex.candidates)
    got = ranker.scores(ranker.embed_queries([ex.query])[0], ranker.embed_candidates(ex.candidates))
    assert abs(want - got).max() < 1e-4
