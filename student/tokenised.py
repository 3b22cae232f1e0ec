"""Texts tokenised once, for training loops that see every text many times.

WordPiece is the costly part of a bag-of-subwords forward pass, and in offline
distillation every candidate recurs in many lists and epochs. ``TokenisedTexts``
tokenises a set of texts once and hands out rows of it, in two forms:

* ``rows(index)``: the padded ``(input_ids, attention_mask)`` pair every student's
  towers take (``Student.embed_queries`` / ``embed_candidates``);
* ``bags(index)``: ``Bags`` of distinct subword ids with their counts, the input of
  ``torch.nn.functional.embedding_bag`` (``BowStudent.embed_bags``), which never
  materialises the ``[n, L, dim]`` tensor of the padded form.

A student picks the form it can use in ``Student.embed_tokenised``. This module
depends on the tokenizer only, so ``student.base`` can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from student.tokenizer import SubwordTokenizer


class Bags(NamedTuple):
    """Texts as bags of subwords, the input of ``embedding_bag``.

    Attributes
    ----------
    ids : Tensor
        int64 ``[nnz]``: the distinct compact subword ids of every text, text after text.
    offsets : Tensor
        int64 ``[n]``: where each text's bag starts in ``ids``.
    counts : Tensor
        float32 ``[nnz]``: occurrences of each id in its text (after truncation).
    bag : Tensor
        int64 ``[nnz]``: which text (row of the bag) each id belongs to.
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    bag: torch.Tensor


class TokenisedTexts:
    """Texts tokenised once: a padded id matrix and CSR bags of subwords.

    The bags are CSR rows of (distinct compact id, count), truncated like the padded
    form, so a bag-of-subwords tower can be computed with one ``embedding_bag`` over
    them instead of a gather over the padded ids.

    Parameters
    ----------
    tokenizer : SubwordTokenizer
        A fitted tokenizer (the student's).
    texts : sequence of str
        The texts, in the order ``index`` arguments refer to.
    max_len : int
        Subwords kept per text (longer texts are truncated).

    Examples
    --------
    >>> tok = SubwordTokenizer(max_vocab=16, oov_buckets=1).fit(["read the file", "file"])
    >>> texts = TokenisedTexts(tok, ["read the file file", "the"], max_len=8)
    >>> len(texts)
    2
    >>> ids, mask = texts.rows(torch.tensor([1]))  # trimmed to the longest selected text
    >>> ids.shape, int(mask.sum())
    (torch.Size([1, 1]), 1)
    >>> texts.bags(torch.tensor([0])).counts.tolist()  # "file" twice, one row per distinct id
    [2.0, 1.0, 1.0]
    """

    def __init__(self, tokenizer: SubwordTokenizer, texts: Sequence[str], max_len: int) -> None:
        self.ids, self.mask = tokenizer.encode_batch(list(texts), max_len)
        self.lengths = self.mask.sum(1)
        indptr, flat, counts = [0], [], []
        for row in self.ids.numpy():
            uniq, cnt = np.unique(row[row != 0], return_counts=True)
            flat.append(uniq)
            counts.append(cnt)
            indptr.append(indptr[-1] + len(uniq))
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.flat = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        self.counts = (np.concatenate(counts) if counts else np.zeros(0)).astype(np.float32)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(input_ids, attention_mask)`` of the selected texts.

        Parameters
        ----------
        index : Tensor
            int64 ``[n]`` rows to select (repeats allowed).

        Returns
        -------
        tuple of Tensor
            Both int64 ``[n, L]``, ``L`` the longest selected length (at least 1).
        """
        width = max(int(self.lengths[index].max()), 1) if index.numel() else 1
        return self.ids[index, :width], self.mask[index, :width]

    def bags(self, index: torch.Tensor) -> Bags:
        """The selected texts as ``Bags``, in the order of ``index``.

        Parameters
        ----------
        index : Tensor
            int64 ``[n]`` rows to select (repeats allowed).

        Returns
        -------
        Bags
            ``n`` bags; ``offsets`` and ``bag`` refer to positions in ``index``.
        """
        rows = index.numpy()
        starts, sizes = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(rows) else np.zeros(0)
        take = np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()))
        bag = np.repeat(np.arange(len(rows)), sizes)
        return Bags(torch.from_numpy(self.flat[take]), torch.from_numpy(offsets.astype(np.int64)),
                    torch.from_numpy(self.counts[take]), torch.from_numpy(bag))
