"""Training losses for students: distillation, feedback, and their online mix.

All losses take *logits* ``[B, K]`` (one row per query, one column per candidate)
and an optional boolean ``mask`` ``[B, K]`` marking real candidates, so ragged
candidate lists (``Student.forward_scores``) need no special casing. Student
logits are ``s_S * cosine``; teacher logits are ``logit_scale * cosine`` with the
scale stored in each ``SoftLabelRecord`` (a softmax over raw cosines is almost flat).
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
    """Listwise knowledge distillation (Hinton et al. 2015) over each query's candidates.

    ``loss = T^2 * mean_b KL( softmax(t_b / T) || softmax(s_b / T) )``

    where ``t_b = s_T * cos_T`` are the teacher's logits (scaled by its stored
    ``logit_scale``) and ``s_b = s_S * cos_S`` the student's, both over the masked
    candidates of query ``b``. The ``T^2`` keeps gradient magnitudes comparable
    across temperatures: ``d loss / d s_bk = T * (p_S - p_T)_bk / B``. Rows without
    any candidate are left out of the mean.
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
    """Margin-MSE (Hofstätter et al. 2020, as in sentence-transformers' MarginMSELoss).

    ``loss = mean( ((s_pos - s_neg) - (t_pos - t_neg))^2 )``

    The student matches the teacher's *margins* between a positive and each
    negative, not its absolute scores, so an offset between the two score ranges
    costs nothing. ``*_pos`` are ``[B]`` (or ``[B, 1]``), ``*_neg`` ``[B]`` or ``[B, N]``
    (several negatives per positive), ``mask`` ``[B, N]`` marks real negatives.
    Pass both sides in the same units (logits recommended).
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
    loss on true relevance (Joachims et al. 2017; Ai et al. 2018):

    ``loss = (1 / |Q_c|) * sum_b sum_k c_bk * w(r_bk) * -log softmax(s_b)_k``

    with ``c`` the clicks, softmax over the query's masked candidates and ``Q_c``
    the queries with at least one click (so the scale does not depend on the click
    rate). ``eta = 0`` gives the naive, unweighted click loss; with relevance labels
    as ``clicks`` it is plain listwise cross-entropy on hard labels.
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
    ) -> Tensor:
        """``ranks`` default to the column order (candidates listed as displayed)."""
        mask = _full_mask(student_logits, mask)
        if ranks is None:
            ranks = torch.arange(1, student_logits.shape[-1] + 1, device=student_logits.device)
            ranks = ranks.expand_as(student_logits)
        clicks = clicks.to(student_logits.dtype).masked_fill(~mask, 0.0)
        clicked = clicks.sum(dim=-1) > 0
        if not clicked.any():
            return _zero(student_logits)
        nll = -_masked_log_softmax(student_logits, mask)
        per_query = (clicks * self.weights(ranks).to(nll.dtype) * nll).sum(dim=-1)
        return per_query.sum() / clicked.sum()


class OnlineLossParts(NamedTuple):
    """The total (with gradient) and its parts, detached, for logging."""

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
    ) -> OnlineLossParts:
        """``has_teacher`` ``[B]`` bool: rows whose ``teacher_logits`` are real (default: all)."""
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
                fb = self.feedback(student_logits, clicks, ranks, mask)
        loss = self.alpha * kd + (1.0 - self.alpha) * fb
        return OnlineLossParts(loss, float(kd.detach()), float(fb.detach()), n_kd, n_fb)
