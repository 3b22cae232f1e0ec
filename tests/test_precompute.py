"""Precompute into the stores: labels match the teacher, runs resume after an interruption."""

from pathlib import Path

from codistill.config import load_settings
from stores import open_store
from tests.helpers.precompute import run_interrupted_then_resumed


def test_embedded_precompute_resumes(teacher, tmp_path: Path) -> None:
    store = open_store(load_settings(home=tmp_path).resolved_store())
    try:
        run_interrupted_then_resumed(teacher, store)
    finally:
        store.close()
