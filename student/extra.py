"""Extra queries: texts the query tower learns from beside the labelled train queries.

Why: a query tower trained on a few thousand docstring-shaped queries knows only
that corner of the teacher's space. Out of distribution it is far worse than the
teacher, worst where the query is code (the code -> code guard set): it has never
embedded code. Any text the teacher embedded is a lesson without a label:

* **code as queries**: the train candidates' code, whose teacher vectors are already
  in the store (no teacher cost), so the tower learns to put a function where the
  teacher puts it;
* unlabeled text mined from the same train files (``tasks.unlabeled``), embedded by
  the teacher once (cached).

Each extra text ``x`` with teacher vector ``t_x`` adds, per step of ``fit``,

    extra_weight * (1 - cos(q_S(x), t_x))
    + extra_kd_weight * ListwiseKD_T(s_S q_S(x) C^T, s_T t_x C^T)

where ``C`` are ``extra_list`` teacher candidate vectors drawn from the train
candidates: a *pseudo-list*, so the student also learns how the teacher would rank
real code for that text, not only where the text lies. Both terms are zero-cost for
the teacher (its vectors are stored); the recipe fields are in
``codistill.recipes.DistillConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from codistill.recipes import DistillConfig
from student.base import Student
from student.losses import CosineRegressionLoss, ListwiseKDLoss
from student.tokenised import TokenisedTexts
from student.tokenizer import SubwordTokenizer


class ExtraQueries:
    """Texts for the query tower with their teacher embeddings, tokenised once.

    Parameters
    ----------
    tokenizer : SubwordTokenizer
        The student's tokenizer.
    texts : sequence of str
        The texts (queries as the server would see them).
    vectors : numpy.ndarray or Tensor
        ``[n, d]`` the teacher's embeddings of ``texts`` (normalised here).
    max_len : int
        Subwords kept per text: the student's ``query_max_len``, so a text is cut
        as the server would cut it.
    teacher_scale : float
        The teacher's logit scale (pseudo-list logits are ``teacher_scale * cos``).

    Examples
    --------
    >>> tok = SubwordTokenizer(max_vocab=32).fit(["def add(a, b): return a + b", "read file"])
    >>> extra = ExtraQueries(tok, ["def add(a, b): return a + b"], np.ones((1, 4)), 16, 20.0)
    >>> len(extra), round(float(extra.vectors.norm()), 4)
    (1, 1.0)
    """

    def __init__(self, tokenizer: SubwordTokenizer, texts: Sequence[str],
                 vectors: np.ndarray | torch.Tensor, max_len: int, teacher_scale: float) -> None:
        vec = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if vec.ndim != 2 or vec.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but vectors of shape {tuple(vec.shape)}")
        self.texts = TokenisedTexts(tokenizer, list(texts), max_len)
        self.vectors = F.normalize(vec, dim=-1)
        self.teacher_scale = float(teacher_scale)

    def __len__(self) -> int:
        return len(self.texts)

    def loss(self, student: Student, index: torch.Tensor, pool: torch.Tensor,
             cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The two extra terms (weighted) for rows ``index``, against candidate vectors ``pool``.

        Parameters
        ----------
        student : Student
            Its query tower is trained.
        index : Tensor
            int64 ``[n]`` rows of this set.
        pool : Tensor
            ``[m, d]`` teacher candidate vectors: the pseudo-list shared by the rows.
        cfg : DistillConfig
            ``extra_weight``, ``extra_kd_weight`` and ``temperature`` are read.

        Returns
        -------
        tuple of Tensor
            The regression and the pseudo-list KD term, each already weighted.
        """
        q = student.embed_tokenised("query", self.texts, index)
        t = self.vectors[index]
        reg = CosineRegressionLoss()(q, t) * cfg.extra_weight
        if cfg.extra_kd_weight <= 0 or pool.shape[0] < 2:
            return reg, torch.zeros((), dtype=q.dtype)
        kd = ListwiseKDLoss(cfg.temperature)(student.score_embeddings(q, pool),
                                             self.teacher_scale * t @ pool.T)
        return reg, kd * cfg.extra_kd_weight


def sample_rows(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``min(k, n)`` distinct rows of ``range(n)``, drawn with ``gen``."""
    return torch.randperm(n, generator=gen)[: min(k, n)]
