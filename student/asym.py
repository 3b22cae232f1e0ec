"""The asymmetric student: a bag-of-subwords *query* tower in the teacher's space.

Code corpora change slowly and the teacher already wrote an embedding of every
candidate into the store (``codistill teacher precompute``). So the student only
has to encode the *query*, into the teacher's embedding space, and scores
``s_S * cosine(q_student, c_teacher)`` against those stored vectors. The candidate
side keeps the teacher's full quality; the query side is a BoW tower (one gather,
one matmul) that exports to a single small ONNX graph.

How it compares with the symmetric ``BowStudent`` (each with and without the static
start of ``student.static_init``), BM25 and the teacher: ``benchmarks/student.py``,
measured in ``benchmarks/results/student-demo.json``.

The price is a runtime dependency: candidates must be in the store under the
student's teacher version (``StoreCandidates``), and a student of one teacher
version can never score against another version's vectors (``Student.load``
checks the version; the trainer refuses to re-pin it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from codistill.ids import candidate_id
from stores.base import CandidateStore
from student.base import register_student
from student.bow import BowConfig, BowStudent


class MissingCandidateError(KeyError):
    """A candidate has no teacher embedding in the store (not precomputed for this version)."""


class StoreCandidates:
    """``IdCandidateSource`` over a store: the teacher's vectors of one version, by id.

    The store holds each vector under the id precompute was given: the ranking
    file's ``candidate_ids``, which are content hashes by default but may be any
    names a user chose. So callers that know the ids use ``embed_ids`` (the
    student does whenever it is given ``candidate_ids``); ``embed`` maps texts to
    ``candidate_id`` and is right only for content-hash ids.

    Parameters
    ----------
    store : CandidateStore
        Where ``codistill teacher precompute`` wrote the candidate embeddings.
    version : str
        The teacher version (the student's ``teacher_version``).
    call : callable, optional
        Wraps each store read, e.g. with the online trainer's back-off-and-retry, so
        a store outage is handled where the caller handles the others.
    """

    def __init__(self, store: CandidateStore, version: str,
                 call: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.store = store
        self.version = version
        self._call = call or (lambda fn: fn())

    def embed_ids(self, ids: Sequence[str]) -> Tensor:
        """The teacher's embeddings of candidate ids.

        Parameters
        ----------
        ids : sequence of str
            Candidate ids as precompute stored them (a ranking file's
            ``candidate_ids``: content hashes or user-chosen names).

        Returns
        -------
        Tensor
            float32 ``[n, d]``, in the order of ``ids``.

        Raises
        ------
        MissingCandidateError
            If any id has no embedding under the version.
        """
        emb, found = self._call(lambda: self.store.get_embeddings(self.version, list(ids)))
        if len(ids) and not np.all(found):
            missing = [i for i, ok in zip(ids, found, strict=True) if not ok]
            raise MissingCandidateError(
                f"{len(missing)} of {len(ids)} candidates have no embedding for teacher "
                f"{self.version} (first: {missing[0]}); precompute them with "
                "`codistill teacher precompute`"
            )
        return torch.from_numpy(np.asarray(emb, dtype=np.float32))

    def embed(self, texts: Sequence[str]) -> Tensor:
        """``embed_ids`` of the texts' content ids: the fallback when no ids are known.

        Raises ``MissingCandidateError`` for candidates stored under user-chosen ids;
        pass those ids to ``embed_ids`` (``Student.score(..., candidate_ids=...)``).
        """
        return self.embed_ids([candidate_id(t) for t in texts])


@register_student
class AsymmetricBowStudent(BowStudent):
    """BoW query tower into the teacher's space; candidates come from a ``CandidateSource``.

    Takes ``BowStudent``'s arguments; ``config`` must keep ``share_embedding`` and
    ``share_projection`` True (there is one tower), ``candidate_source`` is required
    and ``out_dim`` must be the teacher's embedding size.
    """

    kind = "asym-bow"
    has_candidate_tower = False

    def __init__(self, tokenizer: Any, teacher_version: str, config: BowConfig | None = None,
                 **kwargs: Any) -> None:
        config = config or BowConfig()
        if not (config.share_embedding and config.share_projection):
            raise ValueError("an asymmetric student has one tower: share_* must stay True")
        super().__init__(tokenizer, teacher_version, config, **kwargs)

    def embed_candidates(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError("asym-bow scores against the teacher's stored candidate "
                                  "embeddings (its candidate_source), not a tower")
