"""A loaded bundle: ONNX Runtime sessions plus the bundle's own tokenizer, no torch.

:class:`OnnxRanker` is what a server holds per bundle. Loading verifies every file
hash first (:meth:`serving.bundle.BundleRegistry.verify`), opens one ONNX Runtime
session per graph with the configured threads and graph optimisation level, and
rebuilds the compact subword vocabulary from the bundle's ``tokenizer.json`` and card,
so tokens are cut exactly as in training (checked at export, see
:func:`token_parity`). :meth:`OnnxRanker.warm` runs every graph before the ranker is
offered to traffic and :meth:`OnnxRanker.probe` checks outputs and latency: the
server never swaps in a ranker that has not passed both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from codistill.subwords import Subwords
from serving.bundle import TOKENIZER_FILE, BundleCard, BundleError, BundleRegistry

GraphLevel = Literal["disable", "basic", "extended", "all"]
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int = 1, graph_level: GraphLevel = "all") -> ort.SessionOptions:
    """ORT options used everywhere a bundle (or the ONNX teacher) runs: one place, same speed."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _LEVELS[graph_level]
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    return opts


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    latency_ms: float


class OnnxRanker:
    """One bundle, ready to score: ``embed_queries``, ``embed_candidates``, ``scores``.

    Parameters
    ----------
    folder : Path
        The bundle folder (already verified by the caller, see :meth:`load`).
    card : BundleCard
        Its card.
    threads, graph_level
        ONNX Runtime intra-op threads and graph optimisation level.
    """

    def __init__(self, folder: Path, card: BundleCard, threads: int = 1,
                 graph_level: GraphLevel = "all") -> None:
        self.card = card
        self.version = card.bundle_version
        self.folder = Path(folder)
        opts = session_options(threads, graph_level)
        self._sessions = {
            role: ort.InferenceSession(str(self.folder / name), opts,
                                       providers=["CPUExecutionProvider"])
            for role, name in card.graphs.items()
        }
        self.tokenizer = Subwords.from_dict(card.tokenizer,
                                            tokenizer_path=self.folder / TOKENIZER_FILE)

    @classmethod
    def load(cls, registry: BundleRegistry, version: str, threads: int = 1,
             graph_level: GraphLevel = "all") -> OnnxRanker:
        """Verify ``version``'s hashes, then open it (raises ``BundleError`` on any problem)."""
        card = registry.verify(version)
        try:
            return cls(registry.path(version), card, threads, graph_level)
        except (OSError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            raise BundleError(f"bundle {version}: cannot be opened: {exc}") from exc

    @property
    def scale(self) -> float:
        return self.card.logit_scale

    def _run(self, role: str, texts: Sequence[str], max_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros((0, self.card.embedding_dim), dtype=np.float32), np.zeros((0, 1))
        ids, mask = self.tokenizer.encode(list(texts), max_len)
        out = self._sessions[role].run(["embeddings"], {"input_ids": ids,
                                                        "attention_mask": mask})[0]
        return normalize(out.astype(np.float32, copy=False)), ids

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, d]`` unit query embeddings."""
        return self._run("query", texts, self.card.query_max_len)[0]

    def embed_query_counted(self, text: str) -> tuple[np.ndarray, int, int]:
        """One query's unit embedding, its subword count and how many are out of vocabulary.

        The counts come from the ids the graph ran on (after truncation), so the OOV
        share is exactly what the student saw.
        """
        vecs, ids = self._run("query", [text], self.card.query_max_len)
        return vecs[0], int((ids > 0).sum()), int(self.tokenizer.is_oov(ids).sum())

    def embed_candidates(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, d]`` unit embeddings of candidate *texts*.

        The candidate tower when the bundle has one; otherwise the query tower at the
        candidate length (the fallback of an asymmetric student for candidates the
        store has no teacher vector for).
        """
        role = "candidate" if "candidate" in self._sessions else "query"
        return self._run(role, texts, self.card.candidate_max_len)[0]

    def scores(self, query_vec: np.ndarray, candidate_vecs: np.ndarray) -> np.ndarray:
        """``logit_scale * cosine`` of one query ``[d]`` against candidates ``[k, d]``."""
        if len(candidate_vecs) == 0:
            return np.zeros(0, dtype=np.float32)
        return (self.scale * (normalize(candidate_vecs) @ normalize(query_vec))).astype(np.float32)

    # -- before traffic ----------------------------------------------------------------
    def warm(self, rounds: int = 3) -> None:
        """Run every graph a few times (first runs allocate arenas and pick kernels)."""
        for _ in range(rounds):
            self.embed_queries(["warm up the query graph", "x"])
            self.embed_candidates(["def warm(up):\n    return up", "y"])

    def probe(self, budget_ms: float, texts: Sequence[str] = ("read a file", "parse json")
              ) -> ProbeResult:
        """Finite outputs of the expected shape, and a query encode within ``budget_ms``."""
        start = time.perf_counter()
        q = self.embed_queries(list(texts))
        latency = (time.perf_counter() - start) * 1000 / max(1, len(texts))
        c = self.embed_candidates(list(texts))
        for name, arr in (("query", q), ("candidate", c)):
            if arr.shape != (len(texts), self.card.embedding_dim):
                return ProbeResult(False, f"{name} embeddings have shape {arr.shape}", latency)
            if not np.isfinite(arr).all():
                return ProbeResult(False, f"{name} embeddings are not finite", latency)
        if latency > budget_ms:
            return ProbeResult(False, f"query encode took {latency:.2f} ms > {budget_ms} ms",
                               latency)
        return ProbeResult(True, "ok", latency)


def top_order_agrees(reference: np.ndarray, other: np.ndarray, k: int = 10,
                     tie_eps: float = 1e-5) -> bool:
    """Same top-``k`` order as ``reference``, except swaps of near-tied reference scores.

    Position ``i`` may hold a different item only if the two items' *reference*
    scores differ by less than ``tie_eps`` (an ordering no model can be asked to keep).

    Examples
    --------
    >>> ref = np.array([3.0, 2.0, 2.0 + 1e-7, 1.0])
    >>> top_order_agrees(ref, np.array([3.0, 2.1, 2.0, 1.0]))   # swapped a near tie
    True
    >>> top_order_agrees(ref, np.array([1.0, 2.0, 2.0, 3.0]))
    False
    """
    ref_order = np.argsort(-reference, kind="stable")[:k]
    other_order = np.argsort(-other, kind="stable")[:k]
    return all(a == b or abs(float(reference[a] - reference[b])) < tie_eps
               for a, b in zip(ref_order, other_order, strict=True))


def top_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Share of ``reference``'s top-``k`` items that ``other`` also ranks in its top ``k``."""
    k = min(k, len(reference))
    if k == 0:
        return 1.0
    a = set(np.argsort(-reference, kind="stable")[:k].tolist())
    b = set(np.argsort(-other, kind="stable")[:k].tolist())
    return len(a & b) / k


def token_parity(bundle_tok: Subwords, reference_tok: Subwords, texts: Sequence[str],
                 lengths: Sequence[int]) -> list[str]:
    """Texts (at any of ``lengths``) whose ids differ between the two tokenizers."""
    bad: list[str] = []
    for max_len in lengths:
        for start in range(0, len(texts), 512):
            chunk = list(texts[start:start + 512])
            a, _ = bundle_tok.encode(chunk, max_len)
            b, _ = reference_tok.encode(chunk, max_len)
            if a.shape != b.shape or not np.array_equal(a, b):
                for text in chunk:
                    if not np.array_equal(bundle_tok.encode([text], max_len)[0],
                                          reference_tok.encode([text], max_len)[0]):
                        bad.append(text)
    return bad
