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

The table must have the teacher's width (``dim == out_dim == teacher dim``) and the
projection starts as the identity, so the untrained student *is* the static model.
Padding and the hashed OOV rows start at zero: a bucket mixes unrelated subwords.
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
    """Load ``table`` into every embedding table of ``student``; projections become identity.

    Parameters
    ----------
    student : BowStudent
        With ``dim == out_dim == table.shape[1]`` (changed in place).
    table : numpy.ndarray
        ``static_table`` output for the student's tokenizer.

    Raises
    ------
    ValueError
        If the shapes do not fit.
    """
    cfg = student.config
    if table.shape != (student.tokenizer.vocab_size, cfg.dim) or cfg.dim != cfg.out_dim:
        raise ValueError(
            f"static init needs dim == out_dim == the table's width and one row per subword: "
            f"table {table.shape}, student vocab {student.tokenizer.vocab_size}, "
            f"dim {cfg.dim}, out_dim {cfg.out_dim}"
        )
    for emb in student.embeddings:
        emb.weight.copy_(torch.from_numpy(table))
    for proj in student.projections:
        proj.weight.copy_(torch.eye(cfg.dim))
