"""``codistill student export``: a saved student -> a checked, torch-free serving bundle.

The glue between the two halves lives here, above both: the student layer traces
the towers (``student.export.onnx_export``, torch), the serving layer writes and
loads bundles (``serving.bundle``, ``serving.runtime``, no torch). Between the two,
nothing is published until every check passes:

1. ``onnx.checker`` (full check) on every graph, fp32 and int8;
2. **token parity**: the bundle's tokenizer (its own ``tokenizer.json`` and card)
   gives the training tokenizer's ids on every split and guard query and on
   seeded fuzzed strings, at both max lengths;
3. **score parity** on held-out (valid) lists: torch and ONNX Runtime scores of the
   same candidates differ by at most ``max_score_diff`` (``int8_max_score_diff``
   for int8), and the top-10 order is the same except swaps of items whose torch
   scores differ by less than ``tie_eps``; for int8 the mean top-10 overlap must
   reach ``int8_order_agreement`` instead of an exact order.

The bundle then takes a durable pin on its teacher version (consumer
``bundle:<version>``), so the vectors it is scored against cannot expire under it.
"""

from __future__ import annotations

import random
import shutil
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codistill.config import ExportConfig, Settings
from codistill.ranking import RankingExample
from serving.bundle import (
    CANDIDATE_GRAPH,
    DRIFT_REFERENCE,
    PIN_PREFIX,
    QUERY_GRAPH,
    TOKENIZER_FILE,
    BundleCard,
    BundleError,
    BundleRegistry,
    Precision,
    check_graph,
    quantize_int8,
)
from serving.runtime import OnnxRanker, token_parity, top_order_agrees, top_overlap
from serving.vectors import VectorCache, evaluate_bundle, example_scores
from stores.base import Store


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded strings that stress a tokenizer: identifiers, unicode, whitespace, symbols.

    Examples
    --------
    >>> len(fuzz_strings(20)), fuzz_strings(3) == fuzz_strings(3)
    (20, True)
    """
    rng = random.Random(seed)
    pools = [
        string.ascii_letters + "_0123456789",
        string.printable,
        "αβγδ中文日本語한국어éüñçØ€→∑≠😀🐍\u200b\u00a0\t\n",
        "()[]{}.,:;'\"`~!@#$%^&*-+=/\\|<>?",
    ]
    out = []
    for i in range(n):
        pool = "".join(rng.sample(pools, k=rng.randint(1, len(pools))))
        word = "".join(rng.choice(pool) for _ in range(rng.randint(0, 80 if i % 10 else 600)))
        if i % 3 == 0:  # camelCase / snake_case identifiers, the splitter's cases
            word = "".join(w.capitalize() if rng.random() < 0.5 else w + "_"
                           for w in word.split())
        out.append(word)
    return out


def _queries(settings: Settings) -> list[str]:
    from tasks.dataset import SPLITS, built_guards, read_guard, read_split

    texts: list[str] = []
    for split in SPLITS:
        texts += [ex.query for ex in read_split(settings, split)]
    for guard in built_guards(settings):
        texts += [ex.query for ex in read_guard(settings, guard)]
    return list(dict.fromkeys(texts))


def score_parity(student: Any, ranker: OnnxRanker, vectors: VectorCache | None,
                 examples: Sequence[RankingExample], cfg: ExportConfig, precision: Precision
                 ) -> dict[str, Any]:
    """Torch vs ONNX Runtime on the same lists: the figures and whether they pass."""
    diffs, agree, overlap = [], 0, []
    for ex in examples:
        ref = student.score(ex.query, ex.candidates, ex.candidate_ids)
        got, _ = example_scores(ranker, vectors, ex)
        diffs.append(float(np.abs(ref - got).max()))
        agree += top_order_agrees(ref, got, 10, cfg.tie_eps)
        overlap.append(top_overlap(ref, got, 10))
    worst = max(diffs, default=0.0)
    report = {"lists": len(examples), "max_score_diff": worst,
              "top10_order_agreement": agree / max(1, len(examples)),
              "top10_overlap": float(np.mean(overlap)) if overlap else 1.0}
    if precision == "fp32":
        failures = [f"max |torch - onnx| = {worst:.3g} > {cfg.max_score_diff}"] * (
            worst > cfg.max_score_diff)
        if agree < len(examples):
            failures.append(f"top-10 order differs on {len(examples) - agree} of "
                            f"{len(examples)} lists beyond ties < {cfg.tie_eps}")
    else:
        failures = [f"max |torch - onnx| = {worst:.3g} > {cfg.int8_max_score_diff}"] * (
            worst > cfg.int8_max_score_diff)
        if report["top10_overlap"] < cfg.int8_order_agreement:
            failures.append(f"mean top-10 overlap {report['top10_overlap']:.3f} < "
                            f"{cfg.int8_order_agreement}")
    report["failures"] = failures
    return report


def drift_reference(ranker: OnnxRanker, train: Sequence[RankingExample], folder: Path,
                    cfg: ExportConfig) -> dict[str, Any]:
    """Embed a seeded sample of training queries with the bundle's own query graph.

    The server compares recent queries with these (MMD), so they must be what *this*
    graph produces; the training OOV share is kept as the baseline of the served one.
    """
    queries = list(dict.fromkeys(ex.query for ex in train))
    if cfg.drift_reference == 0 or len(queries) < 2:
        return {}
    queries = random.Random(cfg.seed).sample(queries, min(cfg.drift_reference, len(queries)))
    np.save(folder / DRIFT_REFERENCE, ranker.embed_queries(queries).astype(np.float16))
    ids, _ = ranker.tokenizer.encode(queries, ranker.card.query_max_len)
    oov = float(ranker.tokenizer.is_oov(ids).sum() / max(1, int((ids > 0).sum())))
    return {"reference": DRIFT_REFERENCE, "queries": len(queries), "split": "train",
            "oov_share": oov}


def export_bundle(settings: Settings, store: Store, student_version: str | None = None, *,
                  precision: Precision = "fp32", cfg: ExportConfig | None = None,
                  source: dict[str, Any] | None = None,
                  log: Callable[[str], None] = lambda _msg: None) -> BundleCard:
    """Export a saved student (``None``: the current one) as a checked bundle; returns its card.

    Raises
    ------
    BundleError
        If a check fails; nothing is published then.
    """
    from student.asym import StoreCandidates
    from student.base import needs_candidate_source
    from student.export import ONNX_CANDIDATE_FILE, ONNX_QUERY_FILE, onnx_export
    from student.registry import student_registry
    from tasks.dataset import read_split

    cfg = cfg or settings.serving.export
    reg = student_registry(settings.home)
    version = reg.resolve(student_version)
    scard = reg.load_card(version)
    asym = needs_candidate_source(scard.kind)
    teacher = scard.teacher_version
    model = reg.load(version, candidate_source=StoreCandidates(store, teacher) if asym else None)
    bundles = BundleRegistry(settings.bundles_dir)
    staged = bundles.staging()
    try:
        log(f"tracing {version} ({scard.kind}) to ONNX")
        paths = onnx_export(model, staged)
        graphs = {"query": QUERY_GRAPH}
        (staged / ONNX_QUERY_FILE).rename(staged / QUERY_GRAPH)
        if "candidate" in paths:
            (staged / ONNX_CANDIDATE_FILE).rename(staged / CANDIDATE_GRAPH)
            graphs["candidate"] = CANDIDATE_GRAPH
        paths["meta"].unlink()  # the bundle card replaces onnx.json
        for name in graphs.values():
            check_graph(staged / name)
            if precision == "int8":
                fp32 = staged / f"fp32-{name}"
                (staged / name).rename(fp32)
                quantize_int8(fp32, staged / name)
                fp32.unlink()
                check_graph(staged / name)
        shutil.copyfile(model.tokenizer.wordpiece_path, staged / TOKENIZER_FILE)
        card = BundleCard(
            student_version=version, kind=scard.kind, teacher_version=teacher,
            has_candidate_tower=not asym, logit_scale=float(model.scale.detach()),
            embedding_dim=model.embedding_dim, query_max_len=model.query_max_len,
            candidate_max_len=model.candidate_max_len, opset=_opset(staged / QUERY_GRAPH),
            precision=precision, graphs=graphs, tokenizer=model.tokenizer.to_dict(),
            metrics=dict(scard.metrics), source=source or {"student_version": version})
        ranker = OnnxRanker(staged, card, settings.serving.threads,
                            settings.serving.graph_optimization)
        card.drift = drift_reference(ranker, read_split(settings, "train"), staged, cfg)
        texts = _queries(settings) + fuzz_strings(cfg.fuzz_strings, cfg.seed)
        log(f"token parity on {len(texts)} texts")
        bad = token_parity(ranker.tokenizer, model.tokenizer, texts,
                           sorted({model.query_max_len, model.candidate_max_len}))
        valid = read_split(settings, "valid")[: cfg.parity_lists]
        vectors = VectorCache(store, teacher, capacity=10**7) if asym else None
        log(f"score parity on {len(valid)} valid lists ({precision})")
        parity = score_parity(model, ranker, vectors, valid, cfg, precision)
        parity["token_texts"], parity["token_mismatches"] = len(texts), len(bad)
        if bad:
            parity["failures"].append(f"token ids differ on {len(bad)} texts, e.g. {bad[0]!r:.60}")
        if parity["failures"]:
            raise BundleError("export refused: " + "; ".join(parity["failures"]))
        onnx_metrics = {k: v for k, v in evaluate_bundle(ranker, vectors, valid).items()
                        if k != "n_queries"}
        card = card.model_copy(update={"parity": parity,
                                       "metrics": {**card.metrics, "valid (onnx)": onnx_metrics}})
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    card = bundles.publish(staged, card)
    store.pin(teacher, PIN_PREFIX + card.bundle_version)
    log(f"published bundle {card.bundle_version}")
    return card


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
