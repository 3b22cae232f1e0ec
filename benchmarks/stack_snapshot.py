"""The README's dashboard picture: run the local stack, switch the traffic's query source
midway, snapshot every dashboard panel, stop the stack.

    python benchmarks/stack_snapshot.py                # ~6 minutes on 2 cores
    python benchmarks/stack_snapshot.py --minutes 2    # a quick look

``scripts/stack.sh up`` on private ports (its own state folder), traffic at
``traffic.rate`` from valid queries, then from the ``nl2code-prose`` guard set after
``--switch-after`` requests; ``codistill monitor snapshot`` over the whole run; then
``stack.sh down``. Writes ``benchmarks/results/stack-snapshot.png`` and its data
``stack-snapshot.json`` (every panel's series, the settings, the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from codistill.app.monitor import snapshot  # noqa: E402
from codistill.app.processes import free_port  # noqa: E402

PORTS = ("REDIS", "KAFKA", "KAFKA_CONTROLLER", "PROMETHEUS", "SERVER", "TRAINER", "WATCHER")


PHASE_PANELS = ("Online MRR (clicks) by version", "Mean KL(teacher || student) by version",
                "Mean NDCG@10 vs teacher by version", "Query OOV share by version",
                "Embedding MMD² by version")


def phases(data: dict) -> dict[str, dict[str, float | None]]:
    """Median of each quality / drift panel before and after the source switch.

    Both windows skip the first minute of their phase, so a 1-minute ``rate()`` window
    covers one source only; every version's points count (the serving bundle changes).
    """
    run, end = data["run"], data["end"]
    windows = {"valid": (run["traffic_started"] + 60, run["switch_at"]),
               "guard": (run["switch_at"] + 60, end)}
    out: dict[str, dict[str, float | None]] = {}
    for panel in data["panels"]:
        if panel["title"] not in PHASE_PANELS:
            continue
        values = [(t, v) for q in panel["queries"] for s in q["series"]
                  for t, v in s["values"] if v is not None]
        out[panel["title"]] = {
            name: (float(np.median([v for t, v in values if lo <= t <= hi]))
                   if any(lo <= t <= hi for t, _ in values) else None)
            for name, (lo, hi) in windows.items()}
    return out


def print_phases(table: dict[str, dict[str, float | None]]) -> None:
    print(f"{'panel (median)':42} {'valid':>8} {'guard':>8}")
    for title, row in table.items():
        cells = [f"{row[k]:8.4f}" if row[k] is not None else "       -" for k in ("valid", "guard")]
        print(f"{title:42} {' '.join(cells)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="traffic time before the snapshot")
    ap.add_argument("--switch-after", type=int, default=None,
                    help="requests before the guard set (default: half the run)")
    ap.add_argument("--rate", type=float, default=20.0, help="rank requests per second")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stack-snapshot.png")
    args = ap.parse_args()
    switch = args.switch_after or int(args.rate * args.minutes * 60 / 2)
    state = Path(tempfile.mkdtemp(prefix="codistill-stack-"))
    ports = {k: free_port() for k in PORTS}
    env = {**os.environ, "CODISTILL_STACK_STATE": str(state),
           **{f"CODISTILL_STACK_{k}_PORT": str(v) for k, v in ports.items()},
           "CODISTILL_TRAFFIC__RATE": str(args.rate),
           "CODISTILL_TRAFFIC__SWITCH_AFTER": str(switch),
           "CODISTILL_WATCHER__INTERVAL_S": "10"}
    stack = ["bash", str(ROOT / "scripts/stack.sh")]
    # a TERM (a killed benchmark) still runs the `finally` below: no stack left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    try:
        subprocess.run([*stack, "up"], env=env, check=True, cwd=ROOT)
        up_s = time.time() - t0
        traffic_from = time.time()  # stack.sh starts traffic last, right before returning
        print(f"stack up in {up_s:.0f} s; traffic for {args.minutes:g} min, source switch "
              f"after {switch} requests", flush=True)
        time.sleep(args.minutes * 60)
        prom = f"http://127.0.0.1:{ports['PROMETHEUS']}"
        result = snapshot(prom, args.out, minutes=args.minutes + 1)
    finally:
        subprocess.run([*stack, "down"], env=env, check=False, cwd=ROOT)
    data = json.loads(result.json_path.read_text())
    data["run"] = {"minutes": args.minutes, "rate": args.rate, "switch_after": switch,
                   "sources": ["valid", "guard:nl2code-prose"], "stack_up_s": round(up_s, 1),
                   "size": os.environ.get("CODISTILL_STACK_SIZE", "small"),
                   "command": "python benchmarks/stack_snapshot.py " + " ".join(sys.argv[1:]),
                   "machine": machine()}
    data["run"]["traffic_started"] = traffic_from
    data["run"]["switch_at"] = traffic_from + switch / args.rate
    data["phases"] = phases(data)
    result.json_path.write_text(json.dumps(data, separators=(",", ":")))  # ~0.3 MB of points
    print_phases(data["phases"])
    empty = [p["title"] for p in result.panels if not p["series"]]
    print(f"{result.png_path}\n{result.json_path}\npanels without data: {empty or 'none'}")


if __name__ == "__main__":
    main()
