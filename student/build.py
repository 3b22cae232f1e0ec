"""Building a fresh, untrained student for a distillation recipe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from codistill.config import DistillConfig
from codistill.ranking import RankingExample
from student.asym import AsymmetricBowStudent
from student.base import CandidateSource
from student.bow import BowConfig, BowStudent
from student.static_init import init_from_table, static_table
from student.tokenizer import SubwordTokenizer


def build_student(
    examples: Sequence[RankingExample], teacher_version: str, cfg: DistillConfig,
    init_scale: float = 20.0, teacher_dim: int = 384,
    candidate_source: CandidateSource | None = None,
    encode: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> BowStudent:
    """A fresh ``cfg.student`` with its vocabulary fitted on the train queries and candidates.

    The vocabulary includes code subwords even for the query-only ``asym-bow``: with
    the static start they carry the teacher's meaning, so a held-out query naming an
    identifier seen only in code is still understood. Seeds torch's global generator
    with ``cfg.seed`` before the weights are drawn, so a recipe always starts from the
    same weights.

    Parameters
    ----------
    examples : sequence of RankingExample
        The train lists: their queries and distinct candidates fit the tokenizer.
    teacher_version : str
        The teacher the student is distilled from (saved with it).
    cfg : DistillConfig
        ``student``, ``init``, ``max_vocab``, ``oov_buckets``, ``dim`` (capped at
        ``out_dim`` with ``init="teacher"``), ``out_dim``,
        ``query_max_len``, ``candidate_max_len`` and ``seed`` are read.
    init_scale : float, default 20.0
        Starting logit scale ``s_S`` (the teacher's, normally).
    teacher_dim : int, default 384
        The teacher's embedding size: the default ``out_dim``, and ``dim`` with
        ``init="teacher"``.
    candidate_source : CandidateSource, optional
        Required by ``asym-bow``: the teacher's candidate embeddings
        (``student.asym.StoreCandidates``).
    encode : callable, optional
        Texts -> the teacher's embeddings ``[n, teacher_dim]``; required by
        ``init="teacher"`` (``student.static_init``).

    Returns
    -------
    BowStudent
        A ``BowStudent`` or ``AsymmetricBowStudent``, in training mode.

    Raises
    ------
    ValueError
        If ``init="teacher"`` without ``encode``, with ``out_dim`` other than
        ``teacher_dim`` or with ``dim > out_dim``.
    """
    texts = [ex.query for ex in examples]
    texts += list(dict.fromkeys(c for ex in examples for c in ex.candidates))
    tokenizer = SubwordTokenizer(max_vocab=cfg.max_vocab, oov_buckets=cfg.oov_buckets).fit(texts)
    out_dim = cfg.out_dim or teacher_dim
    if cfg.init == "teacher":
        dim = min(cfg.dim, out_dim) if cfg.dim else out_dim
    else:
        dim = cfg.dim or 128
    if cfg.init == "teacher" and not dim <= out_dim == teacher_dim:
        raise ValueError(f"init='teacher' needs out_dim = the teacher's dim ({teacher_dim}) and "
                         f"dim <= out_dim; got dim={dim}, out_dim={out_dim}")
    torch.manual_seed(cfg.seed)
    kind = AsymmetricBowStudent if cfg.student == "asym-bow" else BowStudent
    student = kind(
        tokenizer, teacher_version, BowConfig(dim=dim, out_dim=out_dim),
        query_max_len=cfg.query_max_len, candidate_max_len=cfg.candidate_max_len,
        init_scale=init_scale, candidate_source=candidate_source,
    )
    if cfg.init == "teacher":
        if encode is None:
            raise ValueError("init='teacher' needs the teacher's encode function")
        init_from_table(student, static_table(tokenizer, encode))
    return student
