"""The train split as tensors: lists, teacher logits, hard labels, tokenised texts.

``TrainSet`` is what ``student.training.fit`` iterates over. It holds every train
query with its (possibly ragged) candidate list, the teacher's logits over that list
(``logit_scale * cosine`` from the stored ``SoftLabelRecord``), the hard labels, and
the queries and distinct candidates tokenised once (``TokenisedTexts``). A batch
goes through any ``Student`` with ``TrainSet.forward``: each distinct candidate of
the batch is embedded once, through ``Student.embed_tokenised``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from codistill.config import DistillConfig
from codistill.ranking import RankingExample
from stores.base import SoftLabelRecord, Store
from student.base import Student
from student.tokenised import TokenisedTexts
from student.tokenizer import SubwordTokenizer


class BatchOut(NamedTuple):
    """One batch through the student (``TrainSet.forward``).

    Attributes
    ----------
    logits : Tensor
        ``[B, K]`` student logits of each query's own list, 0 where ``mask`` is False.
    mask : Tensor
        bool ``[B, K]``: real candidates.
    full : Tensor
        ``[B, U]`` logits of every query against every distinct candidate of the batch.
    gather : Tensor
        int64 ``[B, K]``: column of ``full`` for each list position.
    q : Tensor
        ``[B, d]`` query embeddings.
    c : Tensor
        ``[U, d]`` candidate embeddings (the student's, or the teacher's for a student
        without a candidate tower).
    unique : Tensor
        int64 ``[U]``: the train-candidate rows behind the columns of ``full``.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    full: torch.Tensor
    gather: torch.Tensor
    q: torch.Tensor
    c: torch.Tensor
    unique: torch.Tensor


class TrainSet:
    """Train queries, their candidate rows, teacher logits and hard labels as tensors.

    Lists may be ragged: ``mask`` marks real candidates, padded columns point at
    candidate row 0. Distinct candidate *texts* are numbered in first-seen order,
    each with the id of its first occurrence (as ``student.base.unique_candidates``
    does): the teacher's vectors are read by those ids, never by re-hashing texts,
    so user-chosen ids work.

    Parameters
    ----------
    examples : sequence of RankingExample
        The train lists.
    records : sequence of SoftLabelRecord
        The teacher's record of each list, in the same order (``student.labels.read_labels``).
    tokenizer : SubwordTokenizer
        The student's fitted tokenizer.
    cfg : DistillConfig
        Only ``query_max_len`` and ``candidate_max_len`` are read.

    Attributes
    ----------
    cand_index, mask, teacher_logits, labels : Tensor
        ``[N, K]`` candidate rows, real-candidate mask, teacher logits, hard labels.
    queries, candidates : TokenisedTexts
        The ``N`` queries and the distinct candidates, tokenised once.
    candidate_texts : list of str
        The distinct candidate texts, in row order.
    candidate_ids : list of str
        Id of each distinct candidate, as the ranking file gives it (content hash or
        user-chosen).
    teacher_queries : Tensor
        ``[N, d_T]`` the teacher's L2-normalised query embeddings.
    teacher_candidates : Tensor or None
        ``[C, d_T]`` the teacher's candidate embeddings, once
        ``attach_candidate_embeddings`` ran (needed by a student without a candidate
        tower and by the embedding-matching term).
    """

    def __init__(
        self, examples: Sequence[RankingExample], records: Sequence[SoftLabelRecord],
        tokenizer: SubwordTokenizer, cfg: DistillConfig,
    ) -> None:
        position: dict[str, int] = {}
        self.candidate_ids: list[str] = []
        for ex in examples:
            for text, cid in zip(ex.candidates, ex.candidate_ids, strict=True):
                if text not in position:
                    position[text] = len(position)
                    self.candidate_ids.append(cid)
        width = max(len(ex.candidates) for ex in examples)
        n = len(examples)
        self.cand_index = torch.zeros(n, width, dtype=torch.long)
        self.mask = torch.zeros(n, width, dtype=torch.bool)
        self.teacher_logits = torch.zeros(n, width)
        self.labels = torch.zeros(n, width)
        for i, (ex, rec) in enumerate(zip(examples, records, strict=True)):
            k = len(ex.candidates)
            self.cand_index[i, :k] = torch.tensor([position[t] for t in ex.candidates])
            self.mask[i, :k] = True
            self.teacher_logits[i, :k] = torch.from_numpy(
                rec.logit_scale * rec.scores.astype(np.float32))
            self.labels[i, :k] = torch.tensor(ex.labels, dtype=torch.float32)
        self.queries = TokenisedTexts(tokenizer, [ex.query for ex in examples], cfg.query_max_len)
        self.candidate_texts = list(position)
        self.candidates = TokenisedTexts(tokenizer, self.candidate_texts, cfg.candidate_max_len)
        # the teacher's own embeddings, for the optional embedding-matching term
        self.teacher_queries = F.normalize(torch.from_numpy(np.stack(
            [r.query_embedding.astype(np.float32) for r in records])), dim=-1)
        self.teacher_candidates: torch.Tensor | None = None

    def attach_candidate_embeddings(self, store: Store, version: str) -> None:
        """Read the teacher's embedding of every train candidate (one batched call).

        Parameters
        ----------
        store : Store
            The store holding teacher ``version``'s candidate embeddings.
        version : str
            The teacher version the labels came from.

        Raises
        ------
        LookupError
            If any train candidate has no embedding under ``version``.
        """
        emb, found = store.get_embeddings(version, self.candidate_ids)
        if not found.all():
            raise LookupError(f"teacher {version}: {int((~found).sum())} train candidate "
                              "embeddings missing from the store; run precompute again")
        self.teacher_candidates = F.normalize(torch.from_numpy(emb.astype(np.float32)), dim=-1)

    def __len__(self) -> int:
        return self.cand_index.shape[0]

    def student_logits(self, student: Student, batch: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` student logits of the batch; each distinct candidate encoded once."""
        return self.forward(student, batch).logits

    def forward(self, student: Student, batch: torch.Tensor) -> BatchOut:
        """Scores and embeddings of a batch of train queries.

        Queries and the batch's distinct candidates go through
        ``student.embed_tokenised``; a student without a candidate tower is scored
        against the teacher's candidate embeddings instead.

        Parameters
        ----------
        student : Student
            Any student.
        batch : Tensor
            int64 ``[B]`` train-query rows.

        Returns
        -------
        BatchOut
            Logits over the lists and over all the batch's candidates, and embeddings.
        """
        mask = self.mask[batch]
        rows = self.cand_index[batch]
        unique, inverse = torch.unique(rows[mask], return_inverse=True)
        gather = torch.zeros_like(rows)
        gather[mask] = inverse
        q = student.embed_tokenised("query", self.queries, batch)
        if not student.has_candidate_tower:  # asymmetric: the teacher's own candidate vectors
            if self.teacher_candidates is None:
                raise RuntimeError("attach_candidate_embeddings first: the student has no "
                                   "candidate tower")
            c = self.teacher_candidates[unique]
        else:
            c = student.embed_tokenised("candidate", self.candidates, unique)
        full = student.score_embeddings(q, c)
        logits = full.gather(1, gather).masked_fill(~mask, 0.0)
        return BatchOut(logits, mask, full, gather, q, c, unique)

    def in_batch_labels(self, batch: torch.Tensor, out: BatchOut) -> torch.Tensor:
        """Hard labels over every candidate of the batch.

        Parameters
        ----------
        batch : Tensor
            The rows ``out`` was computed for.
        out : BatchOut
            ``forward(student, batch)``.

        Returns
        -------
        Tensor
            ``[B, U]``: each list's own labels in its columns (the larger one where a
            text occurs twice in a list), 0 for the other lists' candidates.
        """
        labels = (self.labels[batch] * out.mask).to(out.full.dtype)
        return torch.zeros_like(out.full).scatter_reduce(1, out.gather, labels, "amax")
