"""The online trainer holds its teacher version with a *lease*, never a durable pin.

A durable pin is for saved artifacts; a trainer is a running process, and one that
is SIGKILLed cannot remove what it holds. So the trainer leases its version,
renews the lease while it runs (also while it waits for data), and releases it at a
clean exit; a killed trainer's lease runs out on its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stores import open_store
from student.online import OnlineTrainer
from tests.helpers.online import (
    SMALL,
    run_in_process,
    run_trainer,
    setup_online,
    trainer_config,
    wait_for,
)


def test_trainer_leases_its_version_and_a_killed_one_leaves_nothing_permanent(
        tmp_path: Path) -> None:
    settings, _ = setup_online(tmp_path, 120, seed=3)
    summary, _ = run_in_process(settings, name="leaser")
    version = summary["teacher_version"]
    with open_store(settings.resolved_store()) as store:
        assert store.pins(version) == set()
        assert store.holds(version) == []
    run = run_trainer(settings, {**SMALL, "name": "killed", "batch_size": 16, "until_end": True},
                      crash_at="after_step:2")
    assert run.killed
    with open_store(settings.resolved_store()) as store:
        (hold,) = store.holds(version)
        assert (hold.kind, hold.owner) == ("lease", "trainer:killed")
        assert time.time() < hold.expires_at < time.time() + 600


def test_a_waiting_trainer_keeps_renewing_its_lease_and_releases_it_on_stop(
        tmp_path: Path) -> None:
    """Live mode, the producer idle: the lease must outlive many TTLs of waiting."""
    settings, _ = setup_online(tmp_path, 60, seed=8)
    cfg = trainer_config(name="waiter", until_end=False, checkpoint_every=1000,
                         poll_interval_s=0.05, lease_ttl_s=0.6)
    trainer = OnlineTrainer(settings, cfg)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(trainer.run()), daemon=True)
    thread.start()
    try:
        with open_store(settings.resolved_store()) as store:
            version = store.current()
            assert version is not None

            def leases() -> list:
                return [h for h in store.holds(version) if h.kind == "lease"]

            assert wait_for(lambda: bool(leases()), timeout=60)
            first = leases()[0].expires_at
            time.sleep(2.0)  # more than three TTLs of waiting for data
            assert thread.is_alive()
            (hold,) = leases()
            assert hold.owner == "trainer:waiter" and hold.expires_at > first + 1.0
            assert hold.expires_at > time.time()
            trainer.request_stop()
            thread.join(timeout=60)
            assert not thread.is_alive() and result["batches"] > 0
            assert store.holds(version) == []
    finally:
        trainer.request_stop()
        thread.join(timeout=60)
        trainer.close()
