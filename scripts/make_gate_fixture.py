"""Write the per-query MRR@10 of two teacher versions on one split (a gate-test fixture).

The promotion-gate tests resample *real* per-query differences (their spread,
ties and zeros) instead of inventing a distribution. This reads them from a home
where both teachers were evaluated (the embedding cache makes it quick), e.g.
after ``codistill --home H demo``::

    .venv/bin/python scripts/make_gate_fixture.py --home H --old minilm-zs-... \\
        --new minilm-ft-... --out tests/fixtures/gate/minilm_zs_vs_ft_valid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codistill import metrics  # noqa: E402
from codistill.config import load_settings  # noqa: E402
from tasks.dataset import manifest_data_hash, read_split  # noqa: E402
from teacher import workflow as wf  # noqa: E402
from teacher.evaluate import score_examples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--old", required=True, help="incumbent teacher version")
    parser.add_argument("--new", required=True, help="candidate teacher version")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--size", default="demo")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    s = load_settings(home=args.home, data={"size": args.size})
    examples = read_split(s, args.split)
    labels = [ex.labels for ex in examples]
    per = {}
    for role, version in (("old", args.old), ("new", args.new)):
        scores = score_examples(wf.open_teacher(s, version, progress=False), examples)
        per[role] = metrics.per_query(scores, labels, ("mrr@10",))["mrr@10"].round(6).tolist()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "old": args.old, "new": args.new, "split": args.split, "size": args.size,
        "data_hash": manifest_data_hash(s), "metric": "mrr@10",
        "query_ids": [ex.query_id for ex in examples], **per}, indent=0) + "\n")
    print(f"wrote {args.out}: {len(examples)} queries, mean new - old "
          f"{sum(per['new']) / len(examples) - sum(per['old']) / len(examples):+.4f}")


if __name__ == "__main__":
    main()
