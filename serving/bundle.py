"""Serving bundles: everything a server needs to rank with a student, and no torch.

A bundle is one immutable folder ``HOME/bundles/<bundle-version>/``:

===================== ==================================================================
file                  content
===================== ==================================================================
``query.onnx``        the query tower (``input_ids``, ``attention_mask`` int64
                      ``[batch, seq]`` -> L2-normalised float32 ``embeddings [batch, d]``)
``candidate.onnx``    the candidate tower, when the student has one
``tokenizer.json``    the WordPiece file the student's subwords were cut from
``drift-reference.npy`` float16 query-tower embeddings of up to 256 training queries:
                      the reference the server measures query drift (MMD) against
``bundle.json``       the :class:`BundleCard` (compact JSON): versions, kind, logit scale,
                      lengths, opset, precision, the compact vocabulary, metrics and
                      parity at export, and the sha256 of every other file
===================== ==================================================================

A score is ``logit_scale * (q @ c.T)``. A student without a candidate tower
(``asym-bow``) is scored against its teacher's stored candidate vectors (same
``teacher_version``); for a candidate the store does not have, the server runs the
*query* graph on the candidate text (``fallback_graph``), which lands in the same
space because the query tower was trained to.

Why a folder with hashes and a content-derived version (Triton's model repository,
without the mutable version numbers): a bundle is written under a temporary name and
renamed into place (:func:`codistill.fsio.publish_dir`), so a reader never sees half a
bundle; the version is derived from the file hashes and the card fields that change
scores, so the same export gives the same version; and :meth:`BundleRegistry.verify`
re-hashes every file before a server loads it, so a damaged or edited bundle is
refused instead of served.

``serving.json`` beside the bundles records which bundle serves and which served
before it (for rollback); it is switched atomically and read at server start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from codistill.fsio import atomic_write_text, publish_dir, sha256_file, write_synced

BUNDLE_FORMAT = "codistill-bundle"
BUNDLE_FORMAT_VERSION = 1
CARD_FILE = "bundle.json"
POINTER_FILE = "serving.json"
QUERY_GRAPH = "query.onnx"
CANDIDATE_GRAPH = "candidate.onnx"
TOKENIZER_FILE = "tokenizer.json"
DRIFT_REFERENCE = "drift-reference.npy"
PIN_PREFIX = "bundle:"  # a bundle's durable pin on its teacher version: bundle:<version>
DELETING = ".deleting-"  # a bundle on its way out: no longer listed or loadable
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")

Precision = Literal["fp32", "int8"]


class BundleError(RuntimeError):
    """A bundle that cannot be written or served (missing, damaged, failed a check)."""


class BundleIntegrityError(BundleError):
    """A bundle file's sha256 differs from its card: never serve it."""


class BundleCard(BaseModel):
    """What ``bundle.json`` holds; the server trusts nothing else about a bundle."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["codistill-bundle"] = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    bundle_version: str = ""
    student_version: str = Field(description="the student the graphs were exported from")
    kind: str = Field(description="student kind, e.g. asym-bow")
    teacher_version: str = Field(description="teacher whose space the embeddings live in")
    has_candidate_tower: bool
    logit_scale: float = Field(gt=0)
    embedding_dim: int = Field(ge=1)
    query_max_len: int = Field(ge=1)
    candidate_max_len: int = Field(ge=1)
    opset: int
    precision: Precision = "fp32"
    graphs: dict[str, str] = Field(description="role (query, candidate) -> file name")
    tokenizer: dict[str, Any] = Field(description="codistill.subwords.Subwords.to_dict()")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                 description="offline metrics at export")
    parity: dict[str, Any] = Field(default_factory=dict, description="checks run at export")
    source: dict[str, Any] = Field(default_factory=dict,
                                   description="where the weights came from (checkpoint...)")
    drift: dict[str, Any] = Field(default_factory=dict, description="the drift reference: "
                                  "file of training-query embeddings, count, their OOV share")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def fallback_graph(self) -> str:
        """The graph that encodes a candidate text: the candidate tower, else the query tower."""
        return self.graphs["candidate" if "candidate" in self.graphs else "query"]

    def compute_version(self) -> str:
        """``<kind>-<precision>-<hash>`` over the files and every field that changes a score."""
        ident = {
            "format_version": self.format_version,
            "kind": self.kind,
            "teacher": self.teacher_version,
            "scale": round(self.logit_scale, 6),
            "lengths": [self.query_max_len, self.candidate_max_len],
            "precision": self.precision,
            "graphs": self.graphs,
            "tokenizer": self.tokenizer,
            "files": self.files,
        }
        blob = json.dumps(ident, sort_keys=True).encode()
        return f"{self.kind}-{self.precision}-{hashlib.sha256(blob).hexdigest()[:10]}"


class ServingPointer(BaseModel):
    """``serving.json``: the bundle that serves, the one before it, and when it changed."""

    serving: str | None = None
    previous: str | None = None
    changed_at: str | None = None


def check_graph(path: Path) -> None:
    """``onnx.checker`` on one graph; raises :class:`BundleError` naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises several types (ValidationError, InferenceError)
        raise BundleError(f"{path.name}: ONNX checker failed: {exc}") from exc


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization (weights int8, activations quantized per batch).

    ``onnxruntime.quantization.quantize_dynamic`` with signed int8 weights: the
    usual choice for CPU inference of embedding tables and matmuls; the caller checks
    the result against fp32 before it becomes a bundle.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


class BundleRegistry:
    """Bundles under ``bundles_dir`` (normally ``HOME/bundles``) and the serving pointer."""

    def __init__(self, bundles_dir: str | Path) -> None:
        self.dir = Path(bundles_dir)

    def path(self, version: str) -> Path:
        if not _NAME.match(version):
            raise BundleError(f"not a bundle version: {version!r}")
        return self.dir / version

    def staging(self) -> Path:
        """A fresh private folder to assemble a bundle in (removed by ``publish``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def publish(self, staged: Path, card: BundleCard) -> BundleCard:
        """Hash the staged files, derive the version, rename the folder into place.

        Publishing an identical bundle again returns the existing card unchanged:
        bundles are immutable, so the first one's metrics and parity stay.
        """
        try:
            missing = [f for f in [*card.graphs.values(), TOKENIZER_FILE]
                       if not (staged / f).is_file()]
            if missing:
                raise BundleError(f"staged bundle lacks {missing}")
            files = {p.name: sha256_file(p) for p in sorted(staged.iterdir())
                     if p.is_file() and p.name != CARD_FILE}
            card = card.model_copy(update={"files": files})
            card.bundle_version = card.compute_version()
            target = self.path(card.bundle_version)
            if target.exists():
                return self.load_card(card.bundle_version)
            # compact: the vocabulary is most of the card, one line per token would double it
            write_synced(staged / CARD_FILE, card.model_dump_json())
            publish_dir(staged, target)
            return card
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def load_card(self, version: str) -> BundleCard:
        path = self.path(version) / CARD_FILE
        if not path.exists():
            known = ", ".join(self.versions()) or "none"
            raise BundleError(f"no bundle {version!r} under {self.dir} (known: {known})")
        return BundleCard.model_validate_json(path.read_text())

    def file_bytes(self, version: str) -> dict[str, int]:
        """Bytes of every file of a bundle, the card included: what a server loads.

        The student's size target is on their sum (``benchmarks/student.py``); the
        teacher's candidate vectors in the store are counted separately.
        """
        folder = self.path(version)
        self.load_card(version)  # must exist
        return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}

    def verify(self, version: str) -> BundleCard:
        """The card, after every file it lists was re-hashed; raises on any difference."""
        card = self.load_card(version)
        folder = self.path(version)
        for name, digest in card.files.items():
            path = folder / name
            if not path.is_file():
                raise BundleIntegrityError(f"bundle {version}: {name} is missing")
            got = sha256_file(path)
            if got != digest:
                raise BundleIntegrityError(
                    f"bundle {version}: {name} sha256 {got[:16]}... differs from its card "
                    f"({digest[:16]}...)")
        if card.compute_version() != version:
            raise BundleIntegrityError(f"bundle {version}: the card was edited "
                                       f"(its fields give {card.compute_version()})")
        return card

    def delete(self, version: str) -> BundleCard:
        """Remove a bundle that neither serves nor is the rollback target; returns its card.

        The folder is renamed out of sight first (one atomic step: readers see the
        whole bundle or nothing), then removed. The caller releases its teacher pin.
        """
        card = self.load_card(version)
        ptr = self.pointer()
        if version in (ptr.serving, ptr.previous):
            role = "serving" if version == ptr.serving else "the rollback target (previous)"
            raise BundleError(f"bundle {version} is {role}: promote another bundle first")
        doomed = self.dir / f"{DELETING}{version}-{uuid.uuid4().hex[:8]}"
        os.rename(self.path(version), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return card

    def versions(self) -> list[str]:
        """Published bundles, oldest first."""
        if not self.dir.exists():
            return []
        cards = [(json.loads(p.read_text()).get("created_at", ""), p.parent.name)
                 for p in self.dir.glob(f"*/{CARD_FILE}") if not p.parent.name.startswith(".")]
        return [v for _, v in sorted(cards)]

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    # -- which bundle serves ------------------------------------------------------------
    def pointer(self) -> ServingPointer:
        path = self.dir / POINTER_FILE
        if not path.exists():
            return ServingPointer()
        return ServingPointer.model_validate_json(path.read_text())

    def set_serving(self, version: str) -> ServingPointer:
        """Record ``version`` as serving and the one it replaces as previous (atomic)."""
        self.load_card(version)  # must exist
        old = self.pointer()
        previous = old.serving if old.serving != version else old.previous
        ptr = ServingPointer(serving=version, previous=previous,
                             changed_at=datetime.now(UTC).isoformat())
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / POINTER_FILE, ptr.model_dump_json(indent=2))
        return ptr

    def resolve(self, spec: str | None) -> str:
        """``None`` / ``"serving"`` -> the serving bundle, ``"latest"`` -> the newest, else as is."""
        if spec in (None, "serving"):
            version = self.pointer().serving or self.latest()
            if version is None:
                raise BundleError(f"no bundle under {self.dir}: run `codistill student export`")
            return version
        if spec == "latest":
            latest = self.latest()
            if latest is None:
                raise BundleError(f"no bundle under {self.dir}")
            return latest
        self.load_card(spec)
        return spec

