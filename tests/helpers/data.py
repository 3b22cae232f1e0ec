"""Built data sets shared by a test session: each data configuration is mined from the
pinned wheels once and copied into every home that asks for it. Tests of the build
itself call ``tasks.build.build_dataset``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from codistill.config import Settings
from tasks.build import build_dataset

ENV = "CODISTILL_TEST_DATA_CACHE"  # set by tests/conftest.py for the session


def build_data(s: Settings) -> Path:
    """``s.data`` built under ``s.data_dir``; returns that folder."""
    root = os.environ.get(ENV)
    if not root:
        build_dataset(s.data, s.data_dir, s.download_dir, progress=False)
        return s.data_dir
    key = hashlib.sha256(s.data.model_dump_json().encode()).hexdigest()[:16]
    built = Path(root) / key
    if not built.exists():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{key}."))
        build_dataset(s.data, tmp, s.download_dir, progress=False)
        tmp.rename(built)
    shutil.copytree(built, s.data_dir, dirs_exist_ok=True)
    return s.data_dir
