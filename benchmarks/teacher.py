"""Teacher benchmark: offline quality (zero-shot vs fine-tuned) and precompute throughput.

    python benchmarks/teacher.py            # demo size, starts Redis itself
    python benchmarks/teacher.py --quick    # tiny run, for the test suite

Writes benchmarks/results/teacher[-quick].json: MRR@10 / NDCG@10 on valid and test
for the zero-shot and the fine-tuned teacher (with the training budget), raw
encode throughput, and precompute throughput into the embedded store and into
Redis, next to the machine and the data manifest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this folder would be sys.path[0] and this file would shadow the
# `teacher` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import machine, service, write_result  # noqa: E402
from codistill.config import Settings, load_settings  # noqa: E402
from stores import open_store  # noqa: E402
from tasks import dataset as ds  # noqa: E402
from tasks.build import build_dataset  # noqa: E402
from teacher import workflow as wf  # noqa: E402
from teacher.model import Teacher  # noqa: E402
from teacher.precompute import precompute  # noqa: E402

console = Console()


def encode_throughput(settings: Settings, version: str, texts: list[str], queries: list[str]) -> dict:
    """Uncached encoding speed of the teacher (what precompute pays on a cold cache)."""
    reg = wf.teacher_registry(settings)
    card = reg.load(version)
    teacher = Teacher(card, reg.model_dir(card), cache=None, batch_size=settings.teacher.batch_size,
                      progress=False)
    out = {}
    for name, batch in (("code", texts), ("queries", queries)):
        start = time.perf_counter()
        teacher.encode(batch)
        out[f"{name}_texts_per_s"] = len(batch) / (time.perf_counter() - start)
        out[f"{name}_texts"] = len(batch)
    return out


def store_throughput(settings: Settings, version: str, splits: dict, redis_url: str) -> dict:
    """Precompute end to end into the embedded store with an empty embedding cache (so it
    includes encoding), then into fresh embedded and Redis stores with the cache that run
    filled, which isolates the store write path."""
    from teacher.cache import EmbeddingCache

    reg = wf.teacher_registry(settings)
    card = reg.load(version)
    cache_dir = settings.home / "bench-cold-cache"
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    teacher = Teacher(card, reg.model_dir(card), cache=EmbeddingCache(cache_dir / "embeddings.sqlite"),
                      batch_size=settings.teacher.batch_size, progress=False)
    embedded = settings.resolved_store()
    runs = [
        ("embedded_cold_cache", embedded.model_copy(update={"path": settings.home / "bench-store-cold"})),
        ("embedded_warm_cache", embedded.model_copy(update={"path": settings.home / "bench-store-warm"})),
        ("redis_warm_cache", settings.store.model_copy(
            update={"backend": "redis", "redis_url": redis_url, "namespace": f"bench{uuid.uuid4().hex[:6]}"})),
    ]
    results = {}
    for name, store_cfg in runs:
        if store_cfg.path is not None and store_cfg.path.exists():
            shutil.rmtree(store_cfg.path)
        store = open_store(store_cfg)
        try:
            stats = precompute(teacher, store, splits, settings.store.embedding_dtype, progress=True)
        finally:
            store.close()
        results[name] = {"seconds": round(stats.seconds, 2), "encode_seconds": round(stats.encode_seconds, 2),
                         "candidates": stats.candidates_written, "queries": stats.queries_written,
                         **{k: round(v, 1) for k, v in stats.rates().items()}}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["small", "demo", "full"])
    ap.add_argument("--quick", action="store_true", help="small data, 3 training steps")
    ap.add_argument("--home", type=Path, default=Path("artifacts/bench-teacher"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=60,
                    help="fine-tuning step budget (no time budget, so the result is reproducible)")
    args = ap.parse_args()

    size = "small" if args.quick else args.size
    settings = load_settings(home=args.home, data={"size": size})
    budget = {"max_steps": 3, "batch_size": 4} if args.quick else {"max_steps": args.steps}
    settings.teacher.train = settings.teacher.train.model_copy(update={**budget, "time_budget_s": 1e9})
    result: dict = {"machine": machine(), "size": size, "quick": args.quick}

    manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=True)
    result["data"] = manifest
    splits = {sp: ds.read_split(settings, sp) for sp in ds.SPLITS}

    def quality(version: str) -> dict:
        teacher = wf.open_teacher(settings, version, progress=True)
        return {sp: wf.evaluate_version(settings, version, splits[sp], ds.metric_label(settings, sp),
                                        True, teacher) for sp in ("valid", "test")}

    zs = wf.zero_shot_version(settings)
    wf.teacher_registry(settings).set_current(zs)  # benchmark always fine-tunes from zero-shot
    result["zero_shot"] = {"teacher_version": zs, **quality(zs)}
    train = wf.train_and_promote(settings, progress=True)
    result["fine_tuned"] = {"teacher_version": train["candidate"], "promoted": train["promoted"],
                            "budget": settings.teacher.train.model_dump(), "train": train["train"],
                            **quality(train["candidate"])}

    test_split = splits["test"]
    code = list(dict.fromkeys(c for ex in test_split for c in ex.candidates))[: 64 if args.quick else 512]
    queries = [ex.query for ex in test_split][: 64 if args.quick else 512]
    result["encode"] = encode_throughput(settings, zs, code, queries)

    with service("redis", "CODISTILL_TEST_REDIS_URL") as redis_url:
        result["precompute"] = store_throughput(settings, wf.ensure_current(settings), splits, redis_url)

    path = write_result("teacher-quick" if args.quick else f"teacher-{size}", result, args.out)
    table = Table("teacher", "valid MRR@10", "test MRR@10", "test NDCG@10", title=f"teacher quality ({size})")
    for name in ("zero_shot", "fine_tuned"):
        r = result[name]
        table.add_row(f"{name} {r['teacher_version']}", f"{r['valid']['mrr@10']:.4f}",
                      f"{r['test']['mrr@10']:.4f}", f"{r['test']['ndcg@10']:.4f}")
    console.print(table)
    t2 = Table("path", "seconds", "candidates/s", "queries/s", title="precompute throughput")
    for name, r in result["precompute"].items():
        t2.add_row(name, str(r["seconds"]), str(r["candidates_per_s"]), str(r["queries_per_s"]))
    console.print(t2)
    console.print(f"encode: {result['encode']['code_texts_per_s']:.1f} code texts/s, "
                  f"{result['encode']['queries_texts_per_s']:.1f} queries/s; written {path}")


if __name__ == "__main__":
    main()
