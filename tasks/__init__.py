"""CodeSearchNet-style code-search ranking sets mined from real Python code.

``build_dataset`` mines docstring -> function pairs from the running stdlib and
pinned pure-Python wheels, splits them by module/package and writes ranking
files with BM25-hard and random negatives; ``load_split`` reads them back.
"""

from tasks.build import DatasetError, build_dataset, load_manifest, load_split

__all__ = ["DatasetError", "build_dataset", "load_manifest", "load_split"]
