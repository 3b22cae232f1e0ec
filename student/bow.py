"""The first student: a neural bag-of-subwords bi-encoder.

Per side: ``e = normalize(P · Σ_i w_i E[x_i] / Σ_i w_i)`` over the unmasked
subwords ``x_i``, with an embedding table ``E`` ``[V, dim]`` (row 0 = padding),
a learned per-subword weight ``w = softplus(u[x])`` (IDF-like: the model can learn
to mute ``self``, ``return``, ``(``), and a bias-free projection ``P`` to
``out_dim``. Without a bias the L2 normalisation makes weighted mean and weighted
sum pooling identical, so ``w`` are pure importance weights.

No attention and no order: encoding costs one gather and one small matmul. The
towers use ``nn.Embedding`` + a masked sum rather than ``EmbeddingBag`` so the
ONNX graph is plain Gather/Mul/ReduceSum/MatMul; training goes through
``embed_bags``, the same function on bags of subwords. Measured quality and speed:
``benchmarks/student.py``, ``benchmarks/results/student-demo.json``.

Sharing: by default the two towers are one (siamese) model, so an untrained
student already matches a query subword with the same subword in code.
``BowConfig`` can untie the projection or the table; unshared parts always start
as copies, so the untrained student is still that lexical matcher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student.base import Student, register_student
from student.tokenised import TokenisedTexts
from student.tokenizer import SubwordTokenizer

_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_INV_1) == 1: all weights start at 1


@dataclass(frozen=True)
class BowConfig:
    """Architecture of a ``BowStudent`` (the vocabulary size comes from the tokenizer).

    Attributes
    ----------
    dim : int, default 128
        Width of the subword table ``E``.
    out_dim : int, default 256
        Embedding size after the projection ``P``.
    share_embedding, share_projection : bool, default True
        One table / projection for both towers; unshared ones start as copies.
    init_std : float, default 0.1
        Standard deviation of the table's normal initialisation.
    """

    dim: int = 128
    out_dim: int = 256
    share_embedding: bool = True
    share_projection: bool = True
    init_std: float = 0.1


@register_student
class BowStudent(Student):
    """Bag-of-subwords bi-encoder; score = ``s_S * cosine`` (see the module docstring).

    Parameters
    ----------
    tokenizer : SubwordTokenizer
        A fitted tokenizer; its ``vocab_size`` sets the table's rows.
    teacher_version : str
        The teacher the student is distilled from.
    config : BowConfig, optional
        The architecture (default ``BowConfig()``).
    **kwargs
        ``Student``'s keyword arguments (lengths, ``init_scale``, ``candidate_source``).
    """

    kind = "bow"

    def __init__(
        self,
        tokenizer: SubwordTokenizer,
        teacher_version: str,
        config: BowConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, teacher_version, **kwargs)
        self.config = config or BowConfig()
        cfg, vocab = self.config, tokenizer.vocab_size
        n_tables = 1 if cfg.share_embedding else 2
        n_proj = 1 if cfg.share_projection else 2
        # index 0 serves queries, index -1 candidates: one module per *distinct* table, so
        # state_dict never holds a tensor twice (safetensors refuses shared tensors)
        self.embeddings = nn.ModuleList(
            nn.Embedding(vocab, cfg.dim, padding_idx=0) for _ in range(n_tables)
        )
        self.token_weights = nn.ModuleList(
            nn.Embedding(vocab, 1, padding_idx=0) for _ in range(n_tables)
        )
        self.projections = nn.ModuleList(
            nn.Linear(cfg.dim, cfg.out_dim, bias=False) for _ in range(n_proj)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=self.config.init_std)
        for weight in self.token_weights:
            nn.init.constant_(weight.weight, _SOFTPLUS_INV_1)
        with torch.no_grad():
            for table in [*self.embeddings, *self.token_weights]:
                table.weight[0].zero_()
            # unshared towers start identical: the untrained model is then a lexical matcher
            # (a subword in the query matches itself in the code), not two unrelated spaces
            for pair in (self.embeddings, self.token_weights, self.projections):
                if len(pair) == 2:
                    pair[1].weight.copy_(pair[0].weight)

    @property
    def embedding_dim(self) -> int:
        return self.config.out_dim

    def _tower(self, side: int, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        emb = self.embeddings[side](input_ids)  # [n, L, dim]
        mask = attention_mask.to(emb.dtype)
        w = F.softplus(self.token_weights[side](input_ids).squeeze(-1)) * mask  # [n, L]
        pooled = (w.unsqueeze(-1) * emb).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
        return F.normalize(self.projections[side](pooled), dim=-1)

    def embed_bags(self, side: int, ids: Tensor, offsets: Tensor, counts: Tensor, bag: Tensor,
                   n: int) -> Tensor:
        """``_tower`` on bags of subwords (distinct ``ids`` per text, their ``counts``).

        The same function, computed with ``embedding_bag``: it never builds the
        ``[n, L, dim]`` tensor of the padded form. ``_tower`` stays the exported form
        (plain Gather/ReduceSum in ONNX); ``tests/test_distill.py`` checks that the
        two agree.

        Parameters
        ----------
        side : int
            0 for the query tower, -1 for the candidate tower.
        ids, offsets, counts, bag : Tensor
            The fields of ``student.tokenised.Bags``: ``ids`` [nnz] distinct compact
            ids, ``offsets`` [n] where each text's bag starts, ``counts`` [nnz] their
            occurrences, ``bag`` [nnz] the text of every id.
        n : int
            Number of texts.

        Returns
        -------
        Tensor
            L2-normalised ``[n, out_dim]``.
        """
        w = F.softplus(self.token_weights[side].weight[ids, 0]) * counts
        num = F.embedding_bag(ids, self.embeddings[side].weight, offsets, mode="sum",
                              per_sample_weights=w)
        den = torch.zeros(n, dtype=w.dtype, device=w.device).index_add(0, bag, w)
        pooled = num / den.clamp_min(1e-6).unsqueeze(1)
        return F.normalize(self.projections[side](pooled), dim=-1)

    def embed_tokenised(
        self, side: Literal["query", "candidate"], texts: TokenisedTexts, index: Tensor
    ) -> Tensor:
        """``Student.embed_tokenised`` through ``embed_bags`` (same values as the towers)."""
        if side != "query" and not self.has_candidate_tower:
            raise NotImplementedError(f"{type(self).__name__} has no candidate tower")
        return self.embed_bags(0 if side == "query" else -1, *texts.bags(index), len(index))

    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._tower(0, input_ids, attention_mask)

    def embed_candidates(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._tower(-1, input_ids, attention_mask)

    def model_config(self) -> dict[str, Any]:
        return asdict(self.config)

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        tokenizer: SubwordTokenizer,
        teacher_version: str,
        **kwargs: Any,
    ) -> BowStudent:
        known = {f.name for f in fields(BowConfig)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown BowConfig fields: {sorted(unknown)}")
        return cls(tokenizer, teacher_version, BowConfig(**config), **kwargs)
