"""Training losses for students: distillation, feedback, and their online mix.

All losses take *logits* ``[B, K]`` (one row per query, one column per candidate)
and an optional boolean ``mask`` ``[B, K]`` marking real candidates, so ragged
candidate lists (``Student.forward_scores``) need no special casing. Student
logits are ``s_S * cosine``; teacher logits are ``logit_scale * cosine`` with the
scale stored in each ``SoftLabelRecord`` (a softmax over raw cosines is almost flat).

Unlike sentence-transformers' losses, which wrap a model and take texts, these take
scores: the caller runs the student (offline: ``student.training.fit``, online: the
trainer), so one loss serves every student kind.

========================== ========================================= ====================
loss                       learns from                               used by
========================== ========================================= ====================
``ListwiseKDLoss``         the teacher's logits over each list       offline and online KD
``MarginMSELoss``          the teacher's positive-negative margins   (available)
``IPWClickLoss``           clicks (or hard labels with ``eta=0``)    offline CE, online
``OnlineLoss``             ``alpha`` KD + ``1 - alpha`` clicks       the online trainer
``CosineRegressionLoss``   the teacher's embedding of any text       extra queries
                                                                     (``student.extra``)
========================== ========================================= ====================
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NEG = -1e9  # finite "minus infinity": softmax gives exactly 0, and no 0 * inf = nan


def _full_mask(logits: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.bool()


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    return F.log_softmax(logits.masked_fill(~mask, _NEG), dim=-1)


def _zero(like: Tensor) -> Tensor:
    """A zero that keeps the graph, so ``backward`` works on an empty part."""
    return like.sum() * 0.0


class ListwiseKDLoss(nn.Module):
    """Listwise knowledge distillation over each query's candidate list.

    ``loss = T^2 * mean_b KL( softmax(t_b / T) || softmax(s_b / T) )``

    where ``t_b = s_T * cos_T`` are the teacher's logits (scaled by its stored
    ``logit_scale``) and ``s_b = s_S * cos_S`` the student's, both over the masked
    candidates of query ``b``: the student learns the teacher's whole distribution
    over the list, not only its top candidate. The ``T^2`` keeps gradient magnitudes
    comparable across temperatures: ``d loss / d s_bk = T * (p_S - p_T)_bk / B``.
    Rows without any candidate are left out of the mean; no gradient flows into the
    teacher's logits.

    Args:
        temperature: softmax temperature ``T`` (> 0); higher values weigh the
            teacher's ranking of the weaker candidates more.

    References:
        - Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network".
          NIPS Deep Learning Workshop, 2015. https://arxiv.org/abs/1503.02531

    Inputs:
        +--------------------------+-----------+------------------------------------+
        | argument                 | shape     | meaning                            |
        +==========================+===========+====================================+
        | ``student_logits``       | ``[B, K]``| the student's logits               |
        +--------------------------+-----------+------------------------------------+
        | ``teacher_logits``       | ``[B, K]``| the teacher's logits (detached)    |
        +--------------------------+-----------+------------------------------------+
        | ``mask`` (optional)      | ``[B, K]``| bool, real candidates; default all |
        +--------------------------+-----------+------------------------------------+

    Output:
        a scalar tensor (0 with a graph if no row has a candidate).

    Example:
        >>> student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, True, False]])  # ragged lists
        >>> loss = ListwiseKDLoss(temperature=2.0)(student, teacher, mask)
        >>> round(loss.item(), 4)
        0.0868
        >>> loss.backward()
        >>> ListwiseKDLoss(temperature=2.0)(teacher, teacher, mask).item()  # same logits
        0.0
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        mask = _full_mask(student_logits, mask)
        rows = mask.any(dim=-1)
        if not rows.any():
            return _zero(student_logits)
        t = self.temperature
        log_p_t = _masked_log_softmax(teacher_logits.detach() / t, mask)
        log_p_s = _masked_log_softmax(student_logits / t, mask)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).masked_fill(~mask, 0.0).sum(dim=-1)
        return t * t * kl[rows].mean()


class MarginMSELoss(nn.Module):
    """Margin-MSE: match the teacher's score margins between a positive and negatives.

    ``loss = mean( ((s_pos - s_neg) - (t_pos - t_neg))^2 )``

    over every (query, negative) pair. The student matches the teacher's *margins*,
    not its absolute scores, so an offset between the two score ranges costs
    nothing: a cross-encoder teacher can train a bi-encoder student. As in
    sentence-transformers' ``MarginMSELoss``, with several negatives per positive
    and a mask. Pass both sides in the same units (logits recommended); no gradient
    flows into the teacher's scores.

    References:
        - Hofstätter, Althammer, Schröder, Sertkan, Hanbury. "Improving Efficient
          Neural Ranking Models with Cross-Architecture Knowledge Distillation".
          2020. https://arxiv.org/abs/2010.02666

    Inputs:
        +--------------------------------------+--------------------+---------------------+
        | argument                             | shape              | meaning             |
        +======================================+====================+=====================+
        | ``student_pos``, ``teacher_pos``     | ``[B]``/``[B, 1]`` | positive's scores   |
        +--------------------------------------+--------------------+---------------------+
        | ``student_neg``, ``teacher_neg``     | ``[B]``/``[B, N]`` | negatives' scores   |
        +--------------------------------------+--------------------+---------------------+
        | ``mask`` (optional)                  | ``[B, N]``         | bool, real negatives|
        +--------------------------------------+--------------------+---------------------+

    Output:
        a scalar tensor (0 with a graph if the mask selects nothing).

    Example:
        >>> loss = MarginMSELoss()(
        ...     torch.tensor([3.0, 1.0]), torch.tensor([[1.0, 0.0], [2.0, 0.5]]),  # student
        ...     torch.tensor([4.0, 2.0]), torch.tensor([[2.5, 1.0], [1.0, 0.0]]))  # teacher
        >>> loss.item()  # margins 2, 3, -1, 0.5 vs 1.5, 3, 1, 2
        1.625
    """

    def forward(
        self,
        student_pos: Tensor,
        student_neg: Tensor,
        teacher_pos: Tensor,
        teacher_neg: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        def margin(pos: Tensor, neg: Tensor) -> Tensor:
            pos = pos.unsqueeze(-1) if pos.dim() == 1 and neg.dim() == 2 else pos
            return pos - neg

        diff = margin(student_pos, student_neg) - margin(teacher_pos, teacher_neg).detach()
        sq = diff.pow(2)
        if mask is None:
            return sq.mean()
        mask = mask.bool()
        if not mask.any():
            return _zero(sq)
        return sq[mask].mean()


class IPWClickLoss(nn.Module):
    """Inverse-propensity-weighted listwise softmax cross-entropy for clicks.

    Under a position-based model a result at 1-based display rank ``r`` is examined
    with propensity ``p(r) = (1 / r)^eta``; a click then means "examined and
    relevant". Weighting each click by ``w(r) = min(1 / p(r), max_weight)`` makes the
    loss an (clipped, hence slightly biased but bounded-variance) estimate of the
    loss on true relevance:

    ``loss = (1 / |Q_c|) * sum_b sum_k c_bk * w(r_bk) * -log softmax(s_b)_k``

    with ``c`` the clicks, softmax over the query's masked candidates and ``Q_c``
    the queries with at least one click (so the scale does not depend on the click
    rate). ``eta = 0`` gives the naive, unweighted click loss; with relevance labels
    as ``clicks`` it is plain listwise (ListNet-style) cross-entropy on hard labels.

    Args:
        eta: position-bias exponent (>= 0); 0 weighs every click 1.
        max_weight: clip of the inverse propensity (>= 1).

    References:
        - Joachims, Swaminathan, Schnabel. "Unbiased Learning-to-Rank with Biased
          Feedback". WSDM 2017. https://arxiv.org/abs/1608.04468
        - Ai, Bi, Luo, Guo, Croft. "Unbiased Learning to Rank with Unbiased
          Propensity Estimation". SIGIR 2018. https://arxiv.org/abs/1804.05938
        - Cao, Qin, Liu, Tsai, Li. "Learning to Rank: From Pairwise Approach to
          Listwise Approach". ICML 2007.

    Inputs:
        +--------------------------+-----------+------------------------------------------+
        | argument                 | shape     | meaning                                  |
        +==========================+===========+==========================================+
        | ``student_logits``       | ``[B, K]``| the student's logits                     |
        +--------------------------+-----------+------------------------------------------+
        | ``clicks``               | ``[B, K]``| clicks (or relevance) per candidate      |
        +--------------------------+-----------+------------------------------------------+
        | ``ranks`` (optional)     | ``[B, K]``| 1-based display ranks; default 1..K      |
        +--------------------------+-----------+------------------------------------------+
        | ``mask`` (optional)      | ``[B, K]``| bool, real candidates; default all       |
        +--------------------------+-----------+------------------------------------------+

    Output:
        a scalar tensor (0 with a graph if nothing was clicked).

    Example:
        >>> loss_fn = IPWClickLoss(eta=1.0, max_weight=10.0)
        >>> loss_fn.weights(torch.tensor([1, 2, 4, 20]))  # a click at rank r counts r times
        tensor([ 1.,  2.,  4., 10.])
        >>> loss = loss_fn(torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 0.0, 1.0]]))
        >>> round(loss.item(), 4)  # 3 * -log softmax(s)_3
        5.8931
    """

    def __init__(self, eta: float = 1.0, max_weight: float = 10.0) -> None:
        super().__init__()
        if eta < 0 or max_weight < 1:
            raise ValueError("eta must be >= 0 and max_weight >= 1")
        self.eta = eta
        self.max_weight = max_weight

    def propensity(self, ranks: Tensor) -> Tensor:
        """Examination probability ``(1 / rank)^eta`` of 1-based ranks."""
        return ranks.to(torch.float32).reciprocal().pow(self.eta)

    def weights(self, ranks: Tensor) -> Tensor:
        """Clipped inverse propensities ``min(rank^eta, max_weight)``."""
        return self.propensity(ranks).reciprocal().clamp(max=self.max_weight)

    def forward(
        self,
        student_logits: Tensor,
        clicks: Tensor,
        ranks: Tensor | None = None,
        mask: Tensor | None = None,
        propensities: Tensor | None = None,
    ) -> Tensor:
        """``ranks`` default to the column order (candidates listed as displayed).

        ``propensities`` ``[B, K]``: examination probabilities logged with the clicks
        (a click model's, an estimate's); where finite they replace ``(1 / rank)^eta``.
        """
        mask = _full_mask(student_logits, mask)
        if ranks is None:
            ranks = torch.arange(1, student_logits.shape[-1] + 1, device=student_logits.device)
            ranks = ranks.expand_as(student_logits)
        clicks = clicks.to(student_logits.dtype).masked_fill(~mask, 0.0)
        clicked = clicks.sum(dim=-1) > 0
        if not clicked.any():
            return _zero(student_logits)
        nll = -_masked_log_softmax(student_logits, mask)
        weights = self.weights(ranks)
        if propensities is not None:
            logged = torch.isfinite(propensities) & (propensities > 0)
            given = propensities.to(torch.float32).clamp(min=1e-12).reciprocal()
            weights = torch.where(logged, given.clamp(max=self.max_weight), weights)
        per_query = (clicks * weights.to(nll.dtype) * nll).sum(dim=-1)
        return per_query.sum() / clicked.sum()


class OnlineLossParts(NamedTuple):
    """The total (with gradient) and its parts, detached, for logging.

    Attributes
    ----------
    loss : Tensor
        The mixed loss, with gradient.
    kd, feedback : float
        The two parts, detached.
    n_kd, n_feedback : int
        Rows with teacher labels / with at least one click.
    """

    loss: Tensor
    kd: float
    feedback: float
    n_kd: int
    n_feedback: int


class OnlineLoss(nn.Module):
    """Mix of distillation and user feedback for online training.

    ``loss = alpha * KD(rows with teacher labels) + (1 - alpha) * feedback(rows with clicks)``

    In a stream, labels for a new query arrive after the teacher has scored it, so
    a batch mixes labelled and unlabelled queries: KD averages over the labelled
    rows only (``has_teacher``), feedback over the clicked ones. An empty part
    counts 0 and the mix is *not* renormalised, so ``alpha`` keeps its meaning
    whatever a batch holds (a batch without clicks is simply a smaller step).

    Args:
        alpha: weight of the KD part, in [0, 1].
        kd: the distillation loss; default ``ListwiseKDLoss(temperature=4.0)``.
        feedback: the click loss; default ``IPWClickLoss()`` (``eta=1``).

    References:
        - Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". 2015.
          https://arxiv.org/abs/1503.02531
        - Joachims, Swaminathan, Schnabel. "Unbiased Learning-to-Rank with Biased
          Feedback". WSDM 2017. https://arxiv.org/abs/1608.04468

    Inputs:
        +--------------------------------+-----------+-----------------------------------+
        | argument                       | shape     | meaning                           |
        +================================+===========+===================================+
        | ``student_logits``             | ``[B, K]``| the student's logits              |
        +--------------------------------+-----------+-----------------------------------+
        | ``mask`` (optional)            | ``[B, K]``| bool, real candidates             |
        +--------------------------------+-----------+-----------------------------------+
        | ``teacher_logits`` (optional)  | ``[B, K]``| teacher logits (KD part)          |
        +--------------------------------+-----------+-----------------------------------+
        | ``has_teacher`` (optional)     | ``[B]``   | bool, rows whose labels are real  |
        +--------------------------------+-----------+-----------------------------------+
        | ``clicks``, ``ranks`` (opt.)   | ``[B, K]``| feedback part (``IPWClickLoss``)  |
        +--------------------------------+-----------+-----------------------------------+

    Output:
        ``OnlineLossParts``: the loss with gradient, its parts and their row counts.

    Example:
        >>> student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> parts = OnlineLoss(alpha=0.5)(
        ...     student, teacher_logits=torch.tensor([[3.0, 1.0, -2.0], [0.0, 0.0, 0.0]]),
        ...     has_teacher=torch.tensor([True, False]),  # row 1's labels are not in yet
        ...     clicks=torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        >>> parts.n_kd, parts.n_feedback
        (1, 1)
        >>> parts.loss.backward()
    """

    def __init__(
        self,
        alpha: float = 0.5,
        kd: nn.Module | None = None,
        feedback: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        self.alpha = alpha
        self.kd = kd if kd is not None else ListwiseKDLoss(temperature=4.0)
        self.feedback = feedback if feedback is not None else IPWClickLoss()

    def forward(
        self,
        student_logits: Tensor,
        mask: Tensor | None = None,
        *,
        teacher_logits: Tensor | None = None,
        has_teacher: Tensor | None = None,
        clicks: Tensor | None = None,
        ranks: Tensor | None = None,
        propensities: Tensor | None = None,
    ) -> OnlineLossParts:
        """``has_teacher`` ``[B]`` bool: rows whose ``teacher_logits`` are real (default: all);
        ``propensities``: logged examination probabilities for the feedback part (NaN: none)."""
        mask = _full_mask(student_logits, mask)
        kd, n_kd = _zero(student_logits), 0
        if teacher_logits is not None:
            rows = (
                torch.ones(student_logits.shape[0], dtype=torch.bool, device=mask.device)
                if has_teacher is None
                else has_teacher.bool()
            )
            n_kd = int(rows.sum())
            if n_kd:
                kd = self.kd(student_logits[rows], teacher_logits[rows], mask[rows])
        fb, n_fb = _zero(student_logits), 0
        if clicks is not None:
            n_fb = int(((clicks > 0) & mask).any(dim=-1).sum())
            if n_fb:
                extra = {} if propensities is None else {"propensities": propensities}
                fb = self.feedback(student_logits, clicks, ranks, mask, **extra)
        loss = self.alpha * kd + (1.0 - self.alpha) * fb
        return OnlineLossParts(loss, float(kd.detach()), float(fb.detach()), n_kd, n_fb)


class CosineRegressionLoss(nn.Module):
    """Embedding regression: pull the student's embeddings onto the teacher's.

    ``loss = mean_b (1 - cos(q_b, t_b))``

    for student embeddings ``q`` and teacher embeddings ``t`` of the same texts. It
    needs no list and no label, so any text the teacher embedded teaches the student
    its place in the teacher's space (unlabeled docstrings, code used as a query):
    the loss behind Model2Vec-style and Tokenlearn-style static distillation, and the
    ``embed`` term of ``student.training.fit``. No gradient flows into ``t``.

    References:
        - Reimers, Gurevych. "Making Monolingual Sentence Embeddings Multilingual using
          Knowledge Distillation". EMNLP 2020. https://arxiv.org/abs/2004.09813

    Inputs:
        ``student`` ``[B, d]`` and ``teacher`` ``[B, d]`` embeddings (any norm).

    Output:
        a scalar tensor in [0, 2].

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> CosineRegressionLoss()(q, t).item()  # 0 for the first row, 1 for the second
        0.5
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return 1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1).mean()
