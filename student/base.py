"""The interface every codistill student implements, and what they share.

A student is a bi-encoder: a *query tower* and a *candidate tower* map token ids
to L2-normalised embeddings and the score is ``s_S * cosine`` with a learnable
scale ``s_S`` (stored as ``log_scale``, so it stays positive; initialised near
the teacher's scale of 20, clamped at ``MAX_SCALE`` as in CLIP [1]_). The towers
work on tensors (``embed_queries`` / ``embed_candidates``) so that
``student.export.onnx_export`` can write each as an ONNX graph with dynamic batch
and sequence axes; everything text-level (tokenising, scoring, batching) is
written once here. Training loops feed texts tokenised once through
``embed_tokenised``, which a student may override with a faster equivalent of its
towers (``BowStudent`` does).

Asymmetric students
-------------------
A student may have a query tower only and score against candidate embeddings the
*teacher* precomputed (the store holds them per teacher version). Such a class
sets ``has_candidate_tower = False`` and is given a ``CandidateSource`` at
construction or load time; ``encode_candidates`` then asks the source instead of a
tower, and ``forward_scores``, ``score``, ``save`` and ``onnx_export`` (query graph
only) work unchanged. The source is asked by *id* when the caller passes
``candidate_ids``: precompute stores vectors under a ranking file's ids, which a user
may choose (``"my/lib.py::f"``), so re-hashing the texts would miss them. Without
ids, or from a source without ``embed_ids``, it gets the texts. A sketch::

    class StoreCandidates:                       # an IdCandidateSource
        def __init__(self, store: CandidateStore, version: str) -> None: ...
        def embed_ids(self, ids):
            emb, found = self.store.get_embeddings(self.version, ids)
            if not found.all(): raise KeyError(...)  # or encode misses with the teacher
            return torch.from_numpy(emb)
        def embed(self, texts):                  # no ids known: content hashes
            return self.embed_ids([candidate_id(t) for t in texts])

    @register_student
    class AsymmetricBowStudent(Student):
        kind = "asym-bow"
        has_candidate_tower = False
        # embed_queries: a BoW query tower projecting to the teacher's dim (384)

Its ``teacher_version`` must equal the source's version: embeddings of another
teacher live in another space. Saving writes the query tower only; the source is
a runtime dependency passed to ``Student.load(dir, candidate_source=...)``.

References
----------
.. [1] Radford et al. "Learning Transferable Visual Models From Natural Language
   Supervision". ICML 2021. https://arxiv.org/abs/2103.00020
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from student.tokenised import TokenisedTexts
from student.tokenizer import SubwordTokenizer

FORMAT = "codistill-student"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_SCALE = 100.0
ENCODE_CHUNK = 512  # texts per forward pass in encode_*: bounds memory on large corpora

_REGISTRY: dict[str, type[Student]] = {}


@runtime_checkable
class CandidateSource(Protocol):
    """Candidate embeddings for a student without a candidate tower (e.g. teacher's, stored).

    A source keyed by id should also be an ``IdCandidateSource``.
    """

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Return float32 ``[n, d]`` embeddings of ``texts`` (no gradient needed)."""
        ...


@runtime_checkable
class IdCandidateSource(CandidateSource, Protocol):
    """A ``CandidateSource`` that also answers by candidate id (the store's own key)."""

    def embed_ids(self, ids: Sequence[str]) -> Tensor:
        """Return float32 ``[n, d]`` embeddings of the candidates named ``ids``."""
        ...


def unique_candidates(
    candidate_batch: Sequence[Sequence[str]],
    candidate_ids: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, int], list[str] | None]:
    """Number the distinct candidate texts of some lists, with the id of each.

    Distinct *texts*, first-seen order, are what gets encoded (a tower needs texts);
    each takes the id of its first occurrence for a source keyed by id. Keying by
    text with or without ids keeps the encoded set, so every score is unchanged.

    Parameters
    ----------
    candidate_batch : sequence of sequence of str
        Candidate texts per list.
    candidate_ids : sequence of sequence of str, optional
        The ids of those candidates, list by list.

    Returns
    -------
    tuple of (dict of str to int, list of str or None)
        Column of each distinct text, and the id of each column (None without ids).

    Raises
    ------
    ValueError
        If ``candidate_ids`` and ``candidate_batch`` differ in shape.

    Examples
    --------
    >>> unique_candidates([["a", "b"], ["b", "c"]], [["i1", "i2"], ["i2", "i3"]])
    ({'a': 0, 'b': 1, 'c': 2}, ['i1', 'i2', 'i3'])
    """
    index: dict[str, int] = {}
    if candidate_ids is None:
        for cands in candidate_batch:
            for text in cands:
                index.setdefault(text, len(index))
        return index, None
    if len(candidate_ids) != len(candidate_batch):
        raise ValueError(f"candidate_ids has {len(candidate_ids)} lists, "
                         f"candidate_batch {len(candidate_batch)}")
    ids: list[str] = []
    for cands, row_ids in zip(candidate_batch, candidate_ids, strict=True):
        if len(row_ids) != len(cands):
            raise ValueError(f"a list has {len(cands)} candidates but {len(row_ids)} ids")
        for text, cid in zip(cands, row_ids, strict=True):
            if text not in index:
                index[text] = len(index)
                ids.append(cid)
    return index, ids


class BatchScores(NamedTuple):
    """Scores of a ragged batch of candidate lists, padded to ``[B, K]``.

    ``mask[b, k]`` is False where query ``b`` has fewer than ``k + 1`` candidates;
    padded scores are 0 and every loss takes the mask.
    """

    scores: Tensor
    mask: Tensor


def register_student(cls: type[Student]) -> type[Student]:
    """Class decorator: make ``Student.load`` able to rebuild ``cls`` from its ``kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} must set a non-empty 'kind'")
    _REGISTRY[cls.kind] = cls
    return cls


def needs_candidate_source(kind: str) -> bool:
    """Whether a saved student of ``kind`` scores against external candidate embeddings."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown student kind {kind!r}; known: {sorted(_REGISTRY)}")
    return not _REGISTRY[kind].has_candidate_tower


def score_embeddings(q: Tensor, c: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * cosine(q, c)`` of queries against a shared pool or per-query lists.

    Parameters
    ----------
    q : Tensor
        ``[B, d]`` query embeddings (normalised here).
    c : Tensor
        ``[K, d]`` one pool for every query, or ``[B, K, d]`` a list per query.
    scale : Tensor or float
        The logit scale.

    Returns
    -------
    Tensor
        ``[B, K]`` logits.

    Examples
    --------
    >>> score_embeddings(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 10.0)
    tensor([[6., 8.]])
    """
    q = F.normalize(q, dim=-1)
    c = F.normalize(c, dim=-1)
    if c.dim() == 2:
        return scale * (q @ c.T)
    return scale * torch.einsum("bd,bkd->bk", q, c)


class Student(nn.Module, ABC):
    """Base of all students: text-level API, scoring, persistence.

    A subclass sets ``kind`` (and ``has_candidate_tower = False`` if it scores against
    a ``CandidateSource``), implements ``embed_queries`` (and ``embed_candidates``),
    ``embedding_dim``, ``model_config`` and ``from_config``, and is registered with
    ``register_student`` so that ``Student.load`` can rebuild it. It may override
    ``embed_tokenised`` with a faster equivalent of its towers.

    Parameters
    ----------
    tokenizer : SubwordTokenizer
        A fitted tokenizer; its vocabulary is saved with the student.
    teacher_version : str
        The teacher the student was distilled from.
    query_max_len, candidate_max_len : int, default 64, 256
        Subwords kept per query / candidate text.
    init_scale : float, default 20.0
        Starting logit scale ``s_S``.
    candidate_source : CandidateSource, optional
        Candidate embeddings for a student without a candidate tower (required then).
    """

    kind: ClassVar[str] = ""
    has_candidate_tower: ClassVar[bool] = True

    def __init__(
        self,
        tokenizer: SubwordTokenizer,
        teacher_version: str,
        *,
        query_max_len: int = 64,
        candidate_max_len: int = 256,
        init_scale: float = 20.0,
        candidate_source: CandidateSource | None = None,
    ) -> None:
        super().__init__()
        if not tokenizer.is_fitted:
            raise ValueError("the tokenizer must be fitted before building a student")
        if not self.has_candidate_tower and candidate_source is None:
            raise ValueError(f"{type(self).__name__} has no candidate tower: pass candidate_source")
        self.tokenizer = tokenizer
        self.teacher_version = teacher_version
        self.query_max_len = query_max_len
        self.candidate_max_len = candidate_max_len
        self.candidate_source = candidate_source
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    # -- what a concrete student provides -------------------------------------------------
    @abstractmethod
    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids ``[n, L]`` and 0/1 mask ``[n, L]`` -> L2-normalised ``[n, d]``."""

    def embed_candidates(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Candidate tower; students with ``has_candidate_tower = False`` keep this default."""
        raise NotImplementedError(f"{type(self).__name__} has no candidate tower")

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Dimension ``d`` of the embeddings both sides produce."""

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """JSON-ready hyperparameters; ``from_config`` must rebuild the same architecture."""

    @classmethod
    @abstractmethod
    def from_config(
        cls,
        config: dict[str, Any],
        tokenizer: SubwordTokenizer,
        teacher_version: str,
        **kwargs: Any,
    ) -> Student:
        """Build an (untrained) student from ``model_config()`` output."""

    # -- what a concrete student may override ---------------------------------------------
    def embed_tokenised(
        self, side: Literal["query", "candidate"], texts: TokenisedTexts, index: Tensor
    ) -> Tensor:
        """Embed rows of pre-tokenised texts, as training loops do.

        The base runs the padded tower (``embed_queries`` / ``embed_candidates`` on
        ``texts.rows(index)``); a subclass may override it with any computation of
        the same function (``BowStudent`` uses bags of subwords).

        Parameters
        ----------
        side : {"query", "candidate"}
            Which tower.
        texts : TokenisedTexts
            Texts tokenised with this student's tokenizer.
        index : Tensor
            int64 ``[n]`` rows of ``texts`` to embed.

        Returns
        -------
        Tensor
            L2-normalised ``[n, d]``, with gradient unless disabled.
        """
        embed = self.embed_queries if side == "query" else self.embed_candidates
        ids, mask = texts.rows(index)
        device = self.log_scale.device
        return embed(ids.to(device), mask.to(device))

    def size_report(self) -> dict[str, float]:
        """Parameter count and float32 size.

        Returns
        -------
        dict of str to float
            ``parameters`` (every parameter, the logit scale included) and
            ``megabytes`` (``4 * parameters / 1e6``).
        """
        n = sum(p.numel() for p in self.parameters())
        return {"parameters": n, "megabytes": n * 4 / 1e6}

    # -- scoring --------------------------------------------------------------------------
    @property
    def scale(self) -> Tensor:
        """The student's logit scale ``s_S`` (positive, at most ``MAX_SCALE``)."""
        return self.log_scale.clamp(max=math.log(MAX_SCALE)).exp()

    def _encode(self, texts: Sequence[str], side: str) -> Tensor:
        max_len = self.query_max_len if side == "query" else self.candidate_max_len
        embed = self.embed_queries if side == "query" else self.embed_candidates
        device = self.log_scale.device
        chunks = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            ids, mask = self.tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK], max_len)
            chunks.append(embed(ids.to(device), mask.to(device)))
        if not chunks:
            return torch.zeros(0, self.embedding_dim, device=device)
        return torch.cat(chunks)

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised query embeddings ``[n, d]`` (with gradient unless disabled)."""
        return self._encode(list(texts), "query")

    def encode_candidates(self, texts: Sequence[str], ids: Sequence[str] | None = None
                          ) -> Tensor:
        """Candidate embeddings ``[n, d]``, from the candidate tower or the candidate source.

        Parameters
        ----------
        texts : sequence of str
            Candidate code texts (what a tower encodes).
        ids : sequence of str, optional
            Their candidate ids, e.g. a ranking file's ``candidate_ids``. A source
            with ``embed_ids`` is asked by these, since it stores vectors under the
            ids it was given (user-chosen ones included); without ids it gets the
            texts (``StoreCandidates`` then assumes content-hash ids). A tower
            ignores them. As long as ``texts`` (else ``ValueError``).

        Returns
        -------
        Tensor
            ``[n, d]``, with gradient unless disabled (a source's vectors have none).
        """
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(texts)} candidate texts but {len(ids)} ids")
        if self.has_candidate_tower:
            return self._encode(list(texts), "candidate")
        source = self.candidate_source
        assert source is not None  # checked in __init__
        if ids is not None and isinstance(source, IdCandidateSource):
            return source.embed_ids(list(ids)).to(self.log_scale.device)
        return source.embed(list(texts)).to(self.log_scale.device)

    def score_embeddings(self, q: Tensor, c: Tensor) -> Tensor:
        """``s_S * cosine``; see the module-level ``score_embeddings`` for shapes."""
        return score_embeddings(q, c, self.scale)

    def forward_scores(
        self, query_batch: Sequence[str], candidate_batch: Sequence[Sequence[str]],
        candidate_ids: Sequence[Sequence[str]] | None = None,
    ) -> BatchScores:
        """Training scores ``[B, K]`` (student logits) for B queries and their candidate lists.

        Each distinct candidate text in the batch is encoded once (random negatives
        and popular code repeat across queries); lists may differ in length.
        ``candidate_ids`` (the ids of ``candidate_batch``, list by list) go to the
        candidate source, which is keyed by id (``encode_candidates``); give them
        whenever they are known, as ids need not be content hashes.
        """
        if len(query_batch) != len(candidate_batch):
            raise ValueError("query_batch and candidate_batch must have the same length")
        index, ids = unique_candidates(candidate_batch, candidate_ids)
        width = max([len(c) for c in candidate_batch] + [1])
        gather = torch.zeros(len(candidate_batch), width, dtype=torch.long)
        mask = torch.zeros(len(candidate_batch), width, dtype=torch.bool)
        for row, cands in enumerate(candidate_batch):
            gather[row, : len(cands)] = torch.tensor([index[t] for t in cands], dtype=torch.long)
            mask[row, : len(cands)] = True
        q = self.encode_queries(query_batch)
        c = self.encode_candidates(list(index), ids)
        if not index:
            return BatchScores(q.new_zeros(mask.shape), mask.to(q.device))
        gather, mask = gather.to(q.device), mask.to(q.device)
        scores = self.score_embeddings(q, c).gather(1, gather)
        return BatchScores(scores.masked_fill(~mask, 0.0), mask)

    def forward(
        self, query_batch: Sequence[str], candidate_batch: Sequence[Sequence[str]],
        candidate_ids: Sequence[Sequence[str]] | None = None,
    ) -> BatchScores:
        return self.forward_scores(query_batch, candidate_batch, candidate_ids)

    @torch.inference_mode()
    def score(self, query: str, candidates: Sequence[str],
              candidate_ids: Sequence[str] | None = None) -> np.ndarray:
        """Inference: ``s_S * cosine`` of one query against its candidates, float32 ``[K]``.

        Runs in eval mode and restores the previous mode afterwards. Pass
        ``candidate_ids`` when they are known (see ``encode_candidates``): a student
        scored against a candidate source finds user-named candidates only by id.
        """
        was_training = self.training
        self.eval()
        try:
            q = self.encode_queries([query])
            c = self.encode_candidates(list(candidates), candidate_ids)
            return self.score_embeddings(q, c)[0].float().cpu().numpy()
        finally:
            self.train(was_training)

    # -- persistence ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "teacher_version": self.teacher_version,
            "query_max_len": self.query_max_len,
            "candidate_max_len": self.candidate_max_len,
            "model": self.model_config(),
            "tokenizer": self.tokenizer.to_dict(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` (architecture, teacher version, vocabulary) and safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"kind": self.kind, "teacher_version": self.teacher_version}
        save_file(state, str(directory / WEIGHTS_FILE), metadata=meta)
        (directory / CONFIG_FILE).write_text(json.dumps(self._config(), indent=1) + "\n")
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        expected_teacher_version: str | None = None,
        candidate_source: CandidateSource | None = None,
        tokenizer_path: str | Path | None = None,
    ) -> Student:
        """Rebuild any registered student from ``save`` output (dispatches on ``kind``).

        ``expected_teacher_version`` guards against serving a student next to labels
        or embeddings of another teacher.
        """
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / CONFIG_FILE}: not a codistill student (v{FORMAT_VERSION})"
            )
        student_cls = _REGISTRY.get(config["kind"])
        if student_cls is None:
            raise ValueError(f"unknown student kind {config['kind']!r}; known: {sorted(_REGISTRY)}")
        if cls is not Student and not issubclass(student_cls, cls):
            raise ValueError(f"{directory} holds a {config['kind']!r} student, not {cls.__name__}")
        version = config["teacher_version"]
        if expected_teacher_version is not None and version != expected_teacher_version:
            raise ValueError(
                f"student was built on teacher {version!r}, expected {expected_teacher_version!r}"
            )
        tokenizer = SubwordTokenizer.from_dict(config["tokenizer"], tokenizer_path=tokenizer_path)
        kwargs: dict[str, Any] = {
            "query_max_len": config["query_max_len"],
            "candidate_max_len": config["candidate_max_len"],
        }
        if candidate_source is not None:
            kwargs["candidate_source"] = candidate_source
        student = student_cls.from_config(config["model"], tokenizer, version, **kwargs)
        student.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return student.eval()
