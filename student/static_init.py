"""Start a bag-of-subwords student from the teacher's own subword embeddings.

Why: a randomly initialised subword table has to learn, from a few thousand
train queries, what every subword means; most subwords of a held-out query were
seen a handful of times. The teacher already knows: encoding each vocabulary
entry on its own (``"pars"``, ``"##ing"`` -> ``"ing"``) gives a static embedding
per subword in the teacher's space, and the weighted mean of those is a usable
sentence embedding before any training (the idea behind Model2Vec's static
distillation). The student then only has to *correct* it. What the start is worth
for each student, before and after training: ``benchmarks/results/student-demo.json``
(``benchmarks/student.py``). It costs one teacher encoding per kept subword, once;
the teacher's embedding cache answers later runs.

The student's output must have the teacher's width (``out_dim == teacher dim``). With
a table as wide (``dim == out_dim``) the projection starts as the identity, so the
untrained student *is* the static model. A narrower table (``dim = k < out_dim``)
starts as the best rank-k version of it (truncated SVD, ``T ~ (T V_k) V_k^T``: table
``T V_k``, projection ``V_k``), the size lever of a small bundle: the table is most of
the bytes, and a k x d projection costs little. Padding and the hashed OOV rows start
at zero: a bucket mixes unrelated subwords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from student.bow import BowStudent
from student.tokenizer import SubwordTokenizer


def subword_strings(tokenizer: SubwordTokenizer) -> list[str]:
    """The kept subwords as text, in compact-id order (``##`` continuation marks dropped)."""
    return [tokenizer.token_text(i) for i in range(tokenizer.first_kept_id, tokenizer.vocab_size)]


def static_table(tokenizer: SubwordTokenizer,
                 encode: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """The static subword table: the teacher's embedding of every kept subword on its own.

    Parameters
    ----------
    tokenizer : SubwordTokenizer
        The student's fitted tokenizer.
    encode : callable
        Texts -> the teacher's embeddings ``[n, d]`` (called once, on
        ``subword_strings(tokenizer)``).

    Returns
    -------
    numpy.ndarray
        float32 ``[vocab_size, d]``: row ``i`` = ``encode`` of subword ``i``; padding
        and OOV-bucket rows are 0.

    References
    ----------
    .. [1] Tulkens, van Dongen. "Model2Vec: Fast State-of-the-Art Static Embeddings".
       2024. https://github.com/MinishLab/model2vec
    """
    words = subword_strings(tokenizer)
    vectors = np.asarray(encode(words), dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"encode returned shape {vectors.shape} for {len(words)} subwords")
    table = np.zeros((tokenizer.vocab_size, vectors.shape[1]), dtype=np.float32)
    table[tokenizer.first_kept_id:] = vectors
    return table


@torch.no_grad()
def init_from_table(student: BowStudent, table: np.ndarray) -> None:
    """Load ``table`` (or its best rank-``dim`` factorisation) into ``student``.

    Parameters
    ----------
    student : BowStudent
        With ``out_dim == table.shape[1]`` and ``dim <= out_dim`` (changed in place).
        ``dim == out_dim``: every table is ``table`` and every projection the identity.
        ``dim < out_dim``: with the truncated SVD ``table ~ U_k S_k V_k^T``, the tables
        are ``table @ V_k`` and the projections ``V_k``, so the untrained student
        embeds with the rank-``dim`` table closest to ``table`` (Eckart-Young).
    table : numpy.ndarray
        ``static_table`` output for the student's tokenizer.

    Raises
    ------
    ValueError
        If the shapes do not fit.

    Examples
    --------
    >>> import numpy as np
    >>> from student.bow import BowConfig, BowStudent
    >>> from student.tokenizer import SubwordTokenizer
    >>> tok = SubwordTokenizer(max_vocab=50).fit(["read a json file", "parse json"])
    >>> table = np.random.default_rng(0).normal(size=(tok.vocab_size, 8)).astype("float32")
    >>> student = BowStudent(tok, "t", BowConfig(dim=4, out_dim=8))
    >>> init_from_table(student, table)
    >>> student.embeddings[0].weight.shape[1], tuple(student.projections[0].weight.shape)
    (4, (8, 4))
    """
    cfg = student.config
    if table.shape != (student.tokenizer.vocab_size, cfg.out_dim) or cfg.dim > cfg.out_dim:
        raise ValueError(
            f"static init needs out_dim == the table's width, dim <= out_dim and one row per "
            f"subword: table {table.shape}, student vocab {student.tokenizer.vocab_size}, "
            f"dim {cfg.dim}, out_dim {cfg.out_dim}"
        )
    full = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
    if cfg.dim == cfg.out_dim:
        rows, proj = full, torch.eye(cfg.dim)
    else:  # uncentred on purpose: the projection is bias-free, so the mean must survive
        basis = torch.linalg.svd(full.double(), full_matrices=False).Vh[:cfg.dim].T.float()
        rows, proj = full @ basis, basis  # [V, k], [d, k]
    for emb in student.embeddings:
        emb.weight.copy_(rows)
    for p in student.projections:
        p.weight.copy_(proj)
