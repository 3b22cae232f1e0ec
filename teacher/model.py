"""The teacher: a sentence-embedding bi-encoder with a version and a logit scale.

A teacher is described by a ``TeacherCard`` (``teacher.json``): where its
weights are, their hash, the logit scale, the data it was tuned on and its
offline metrics. The *teacher version* is content-addressed: derived from the
tensors and every setting that changes the outputs (sequence length, pooling,
normalization, tokenizer, logit scale) and nothing else, so two machines or
processes that hold the same teacher agree on the version and on the store keys;
lineage and budgets stay on the card.

Logits are ``logit_scale * cosine`` (20, the usual sentence-transformers scale):
a softmax over raw cosines in [-1, 1] is almost flat and useless as a soft label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from codistill.fsio import atomic_write_text, tensors_digest
from codistill.ids import text_hash
from teacher import registry
from teacher.cache import EmbeddingCache

PRETRAINED_PREFIX = "pretrained:"


ID_SCHEME = 2  # 1: file bytes + lineage (before 2026-12); 2: content (tensors + outputs)


class TeacherCard(BaseModel):
    teacher_version: str = ""
    base: str
    kind: Literal["zero-shot", "fine-tuned"]
    model_path: str = Field(description="'pretrained:NAME' or a folder relative to the teachers dir")
    weights_sha256: str = Field(description="sha256 of the weights file (integrity, not identity)")
    logit_scale: float
    max_seq_length: int
    dim: int = 384
    tensors_sha256: str = Field("", description="digest of the tensors (names, dtypes, shapes, "
                                "values): the same weights give it whatever the file bytes")
    pooling: dict[str, Any] = Field(default_factory=dict, description="1_Pooling/config.json")
    normalize: bool = Field(False, description="the model L2-normalises its embeddings")
    tokenizer_sha256: str = ""
    id_scheme: int = Field(1, description="how teacher_version was derived (see ID_SCHEME)")
    data_hash: str | None = None
    train: dict[str, Any] | None = None
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    gate: dict[str, Any] | None = Field(None, description="the promotion gate's decision "
                                        "(codistill.gate) for a fine-tuned teacher")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    def describe_folder(self, folder: Path) -> TeacherCard:
        """Fill the content fields from the model folder (the id's inputs)."""
        self.tensors_sha256 = tensors_digest(folder / "model.safetensors")
        pooling = folder / "1_Pooling" / "config.json"
        self.pooling = json.loads(pooling.read_text()) if pooling.exists() else {}
        modules = json.loads((folder / "modules.json").read_text())
        self.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        tok = next((folder / n for n in ("tokenizer.json", "vocab.txt") if (folder / n).exists()),
                   None)
        self.tokenizer_sha256 = registry.sha256_file(tok) if tok is not None else ""
        self.id_scheme = ID_SCHEME
        return self

    def compute_version(self) -> str:
        """``BASE-zs|ft-DIGEST``, the digest over what changes the outputs and nothing else.

        Two processes that hold the same tensors with the same settings agree on the
        version (and so on the store keys), whatever the file bytes, the training budget
        or the lineage (those stay on the card). Cards of ``id_scheme`` 1 keep the id
        they were saved with.
        """
        if not self.tensors_sha256:
            raise ValueError("describe_folder() first: the version derives from the tensors")
        ident: dict[str, Any] = {
            "tensors": self.tensors_sha256,
            "scale": self.logit_scale,
            "max_seq_length": self.max_seq_length,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "tokenizer": self.tokenizer_sha256,
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.base}-{'zs' if self.kind == 'zero-shot' else 'ft'}-{digest}"


class TeacherRegistry:
    """Teacher cards on disk plus the *current* pointer (switched atomically)."""

    def __init__(self, teachers_dir: Path, home: Path) -> None:
        self.dir = Path(teachers_dir)
        self.home = Path(home)

    def card_path(self, version: str) -> Path:
        return self.dir / version / "teacher.json"

    def save(self, card: TeacherCard) -> TeacherCard:
        if not card.teacher_version:
            card.teacher_version = card.compute_version()
        path = self.card_path(card.teacher_version)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, card.model_dump_json(indent=2))
        return card

    def load(self, version: str) -> TeacherCard:
        path = self.card_path(version)
        if not path.exists():
            known = ", ".join(self.versions()) or "none"
            raise FileNotFoundError(f"no teacher {version!r} under {self.dir} (known: {known})")
        return TeacherCard.model_validate_json(path.read_text())

    def versions(self) -> list[str]:
        return sorted(p.parent.name for p in self.dir.glob("*/teacher.json"))

    def current_version(self) -> str | None:
        ptr = self.dir / "current.json"
        return json.loads(ptr.read_text())["teacher_version"] if ptr.exists() else None

    def set_current(self, version: str) -> None:
        self.load(version)  # must exist
        atomic_write_text(self.dir / "current.json", json.dumps({"teacher_version": version}))

    def model_dir(self, card: TeacherCard) -> Path:
        if card.model_path.startswith(PRETRAINED_PREFIX):
            return registry.locate(card.model_path.removeprefix(PRETRAINED_PREFIX), self.home)
        folder = self.dir / card.model_path
        got = registry.sha256_file(folder / "model.safetensors")
        if got != card.weights_sha256:
            raise registry.TeacherIntegrityError(
                f"teacher {card.teacher_version}: weights sha256 {got[:16]}... "
                f"differs from its card ({card.weights_sha256[:16]}...)"
            )
        return folder

    def _describe_pretrained(self, card: TeacherCard, base: str) -> None:
        """Content fields of a pretrained folder, cached by its weights file's locked hash
        (reading 90-440 MB of tensors once per home, not on every call)."""
        cache = self.dir / "content.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        key = f"{base}:{card.weights_sha256}"
        if key in known:
            card.tensors_sha256, card.pooling, card.normalize, card.tokenizer_sha256 = known[key]
            card.id_scheme = ID_SCHEME
            return
        card.describe_folder(registry.locate(base, self.home))
        known[key] = [card.tensors_sha256, card.pooling, card.normalize, card.tokenizer_sha256]
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, indent=1))

    def zero_shot_card(self, base: str, logit_scale: float, max_seq_length: int) -> TeacherCard:
        """Register (idempotently) the pretrained model as a zero-shot teacher."""
        card = TeacherCard(
            base=base,
            kind="zero-shot",
            model_path=PRETRAINED_PREFIX + base,
            weights_sha256=registry.weights_digest(base, self.home),
            logit_scale=logit_scale,
            max_seq_length=max_seq_length,
        )
        self._describe_pretrained(card, base)
        card.teacher_version = card.compute_version()
        if self.card_path(card.teacher_version).exists():
            return self.load(card.teacher_version)
        return self.save(card)


class Teacher:
    """A loaded teacher: cached, batched encoding plus its logit scale."""

    def __init__(
        self,
        card: TeacherCard,
        model_dir: Path,
        cache: EmbeddingCache | None = None,
        batch_size: int = 64,
        progress: bool = True,
        device: str | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer  # heavy import, only when needed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise

        self.card = card
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        self.model.max_seq_length = card.max_seq_length
        self.model.eval()

    @property
    def version(self) -> str:
        return self.card.teacher_version

    @property
    def logit_scale(self) -> float:
        return self.card.logit_scale

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], desc: str = "encode") -> np.ndarray:
        """L2-normalized float32 embeddings; each unique text encoded once, cached."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        hashes = [text_hash(t) for t in texts]
        unique: dict[str, str] = dict(zip(hashes, texts, strict=True))
        vectors = self.cache.get(self.version, list(unique)) if self.cache else {}
        missing = [h for h in unique if h not in vectors]
        if missing:
            new = self.model.encode(
                [unique[h] for h in missing],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=self.progress and len(missing) > self.batch_size,
            ).astype(np.float32)
            if self.cache:
                self.cache.put(self.version, missing, new)
            vectors.update(zip(missing, new, strict=True))
        return np.stack([vectors[h] for h in hashes])

    def logits(self, cosines: np.ndarray) -> np.ndarray:
        return self.logit_scale * cosines


def load_teacher(
    registry_: TeacherRegistry,
    version: str,
    cache_dir: Path | None,
    batch_size: int = 64,
    progress: bool = True,
) -> Teacher:
    card = registry_.load(version)
    cache = EmbeddingCache(cache_dir / "embeddings.sqlite") if cache_dir else None
    return Teacher(card, registry_.model_dir(card), cache=cache, batch_size=batch_size, progress=progress)
