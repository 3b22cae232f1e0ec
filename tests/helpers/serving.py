"""A small real home for the serving tests: mined data, MiniLM vectors, two students.

The ``small`` data set cut to 40 / 12 / 12 lists of 8 candidates, the zero-shot
MiniLM teacher at 64 subwords precomputed into the embedded store, and two students
distilled for a few epochs: ``asym-bow`` (query tower only, current) and ``bow``
(both towers). Everything a user's home would hold, minutes smaller.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codistill.config import DistillConfig, Settings, load_settings
from codistill.ranking import RankingExample, write_ranking_file
from student.distill import distill
from tasks import dataset as ds
from teacher import workflow as wf
from tests.helpers.data import build_data

SIZES = {"train": 40, "valid": 12, "test": 12}
PER_LIST = 8


def _cut(examples: list[RankingExample], n: int) -> list[RankingExample]:
    out = []
    for ex in examples[:n]:
        keep = [ex.gold_index, *(i for i in range(len(ex.candidates)) if i != ex.gold_index)]
        keep = list(dict.fromkeys(keep))[:PER_LIST]
        out.append(ex.model_copy(update={
            "candidates": [ex.candidates[i] for i in keep],
            "candidate_ids": [ex.candidate_ids[i] for i in keep],
            "labels": [ex.labels[i] for i in keep]}))
    return out


def copy_home(s0: Settings, home: Path) -> Settings:
    """A private copy of a shared home (store, cache, students), without its bundles,
    events and serving state, so a module can serve and write events of its own."""
    shutil.copytree(s0.home, home, ignore=lambda d, names: [
        n for n in names if Path(d) == s0.home and n in {"bundles", "events", "serving"}])
    return s0.model_copy(update={"home": home})


def serving_home(home: Path, **overrides: Any) -> tuple[Settings, dict[str, str]]:
    """Build the home; returns its settings and ``{"asym-bow": version, "bow": version}``."""
    s = load_settings(home=home, data={"size": "small"}, teacher={"max_seq_length": 64},
                      **overrides)
    build_data(s)
    for sp in ds.SPLITS:
        write_ranking_file(s.data_dir / f"{sp}.jsonl", _cut(ds.read_split(s, sp), SIZES[sp]))
    version = wf.ensure_current(s)
    wf.precompute_version(s, version, {sp: ds.read_split(s, sp) for sp in ds.SPLITS}, False)
    students = {}
    for kind in ("bow", "asym-bow"):  # asym-bow last: it is current
        cfg = DistillConfig(student=kind, epochs=3, measure_speed=False, track_valid=False,
                            init="random" if kind == "bow" else "teacher")
        students[kind] = distill(s, cfg, progress=False, set_current=True)["student_version"]
    return s, students


@contextlib.contextmanager
def serve_in_thread(server: Any, port: int | None = None) -> Iterator[str]:
    """A built ``Server`` under uvicorn in a thread on a loopback port; yields its URL.

    Stops uvicorn on exit; closing the server (sink, store, monitor) is the caller's.
    """
    import uvicorn

    from serving.app import create_app
    from tests.helpers.redis_process import free_port

    port = port or free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                        log_level="error", access_log=False))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert web.started, "uvicorn did not start within 20 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(10)


def close_server(server: Any) -> None:
    """Stop what ``build_server`` opened: the monitor thread, the event sink, the store."""
    if getattr(server, "monitor", None) is not None:
        server.monitor.close()
    server.sink.close()
    if server.store is not None:
        server.store.close()
