"""Student benchmark: how much of the teacher's quality each student keeps, and at what size.

    python benchmarks/student.py            # demo size, in the teacher benchmark's home
    python benchmarks/student.py --quick    # small data, two variants, for the test suite

Distils every variant (symmetric ``bow`` / query-only ``asym-bow``, random / static
start from the teacher's subword embeddings) from the same stored soft labels with an
epoch budget only (no wall-clock cap, so a run is reproducible), and reports valid /
test MRR@10 and NDCG@10, the share of the teacher's MRR@10 kept, BM25 on the same
lists, size and query-encoding speed. Writes ``benchmarks/results/student-<size>.json``
and a bar chart next to it.

The teacher is the current one of ``--home``: the fine-tuned MiniLM when
``benchmarks/teacher.py`` ran there first (it promotes it), else the zero-shot one.
Precompute runs only for what the store lacks (the embedding cache makes it cheap).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this folder would be sys.path[0]: put the repository root there.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import machine, write_result  # noqa: E402
from codistill.config import DistillConfig, load_settings  # noqa: E402
from student.distill import distill  # noqa: E402
from student.evaluation import EVAL_SPLITS  # noqa: E402
from tasks import dataset as ds  # noqa: E402
from tasks.build import build_dataset  # noqa: E402
from teacher import workflow as wf  # noqa: E402

console = Console()

VARIANTS: dict[str, dict[str, Any]] = {  # name -> DistillConfig overrides
    "bow, random start": {"student": "bow", "init": "random"},
    "bow, static start": {"student": "bow", "init": "teacher"},
    "asym-bow, random start": {"student": "asym-bow", "init": "random"},
    "asym-bow, static start": {"student": "asym-bow", "init": "teacher"},  # the default
}
DEFAULT = "asym-bow, static start"
QUICK = ("bow, random start", DEFAULT)


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one distillation that the table and the README need."""
    res = summary["results"]
    return {
        "student_version": summary["student_version"],
        "config": summary["config"],
        "valid": res["student"]["valid"], "test": res["student"]["test"],
        "before_training": {sp: res["untrained"][sp] for sp in EVAL_SPLITS},
        "share_of_teacher_mrr@10": summary["share_of_teacher_mrr@10"],
        "megabytes": summary["size"]["megabytes"], "parameters": summary["size"]["parameters"],
        "train_seconds": summary["train"]["seconds"], "epochs_run": summary["train"]["epochs_run"],
        "speed": summary["speed"], "seconds": summary["seconds"],
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: test MRR@10 per variant, BM25 and the teacher as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for k, sp in enumerate(EVAL_SPLITS):
        values = [result["variants"][n][sp]["mrr@10"] for n in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ax.bar(xs, values, width, label=f"student, {sp}")
    for sp, style in zip(EVAL_SPLITS, ("--", ":"), strict=True):
        ax.axhline(result["teacher"][sp]["mrr@10"], color="k", ls=style, lw=1,
                   label=f"teacher, {sp}")
        ax.axhline(result["bm25"][sp]["mrr@10"], color="tab:red", ls=style, lw=1,
                   label=f"BM25, {sp}")
    ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names])
    ax.set_ylabel("MRR@10")
    ax.set_title(f"students distilled from {result['teacher_version']} ({result['size']})")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["small", "demo", "full"])
    ap.add_argument("--quick", action="store_true", help="small data, two variants, 20 epochs")
    ap.add_argument("--home", type=Path, default=Path("artifacts/bench-teacher"))
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (small/quick: 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    size = "small" if args.quick else args.size
    epochs = args.epochs or (20 if args.quick else 60 if size == "small" else 10)
    settings = load_settings(home=args.home, data={"size": size})
    manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=True)
    version = wf.ensure_current(settings)
    splits = {sp: ds.read_split(settings, sp) for sp in ds.SPLITS}
    wf.precompute_version(settings, version, splits, progress=True)

    result: dict[str, Any] = {"machine": machine(), "size": size, "quick": args.quick,
                              "data": manifest, "teacher_version": version, "epochs": epochs,
                              "seed": args.seed, "variants": {}}
    names = QUICK if args.quick else tuple(VARIANTS)
    for name in names:
        console.rule(name)
        cfg = DistillConfig(epochs=epochs, time_budget_s=1e9, seed=args.seed,
                            measure_speed=name == DEFAULT, **VARIANTS[name])
        summary = distill(settings, cfg, progress=True, set_current=name == DEFAULT)
        result["variants"][name] = row(summary)
        result["bm25"] = summary["results"]["bm25"]  # same lists for every variant
        result["teacher"] = summary["results"]["teacher"]

    stem = "student-quick" if args.quick else f"student-{size}"
    path = write_result(stem, result, args.out)
    chart = plot(result, path.with_suffix(".png"))
    table = Table("model", "MB", *(f"{sp} MRR@10" for sp in EVAL_SPLITS),
                  *(f"{sp} share" for sp in EVAL_SPLITS), "train s",
                  title=f"students <- {version} ({size}, {epochs} epochs, seed {args.seed})")
    for name, r in result["variants"].items():
        table.add_row(name, f"{r['megabytes']:.1f}",
                      *(f"{r[sp]['mrr@10']:.4f}" for sp in EVAL_SPLITS),
                      *(f"{r['share_of_teacher_mrr@10'][sp]:.1%}" for sp in EVAL_SPLITS),
                      f"{r['train_seconds']:.0f}")
    for name in ("bm25", "teacher"):
        table.add_row(name, "", *(f"{result[name][sp]['mrr@10']:.4f}" for sp in EVAL_SPLITS),
                      "", "", "")
    console.print(table)
    console.print(f"written {path} and {chart}")


if __name__ == "__main__":
    main()
