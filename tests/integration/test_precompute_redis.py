"""Precompute into a real redis-server: round trip, resume, clear errors."""

import uuid
from pathlib import Path

import pytest

from codistill.config import StoreSettings, load_settings
from stores import StoreUnavailable, open_store
from teacher import workflow as wf
from tests.helpers.precompute import run_interrupted_then_resumed

pytestmark = pytest.mark.integration


def test_redis_precompute_resumes(redis_url: str, tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    teacher = wf.open_teacher(settings, wf.ensure_current(settings), progress=False)
    store = open_store(StoreSettings(backend="redis", redis_url=redis_url, namespace=f"t{uuid.uuid4().hex[:8]}"))
    try:
        run_interrupted_then_resumed(teacher, store)
        assert "redis://" in store.describe()
    finally:
        store.close()


def test_unreachable_redis_names_the_address() -> None:
    with pytest.raises(StoreUnavailable, match="127.0.0.1:1"):
        open_store(StoreSettings(backend="redis", redis_url="redis://127.0.0.1:1/0"))
