"""The students' tokenizer: ``codistill.subwords.Subwords`` with torch tensors out.

The vocabulary logic (WordPiece segmentation, the compact id range, hashed OOV
buckets, identifier splitting) lives in the foundation module so that a server
tokenises with the very same code without importing torch; this subclass only
turns its numpy ids into the tensors the towers take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codistill.subwords import (
    FORMAT_VERSION,
    TOKENIZER_PACKAGE,
    Subwords,
    default_tokenizer_path,
    split_identifiers,
)

__all__ = [
    "FORMAT_VERSION",
    "TOKENIZER_PACKAGE",
    "SubwordTokenizer",
    "default_tokenizer_path",
    "split_identifiers",
]


class SubwordTokenizer(Subwords):
    """``Subwords`` whose ``encode_batch`` returns torch tensors (see ``codistill.subwords``).

    Examples
    --------
    >>> tok = SubwordTokenizer(max_vocab=8, oov_buckets=2).fit(["read_file(path)", "read a file"])
    >>> ids, mask = tok.encode_batch(["readFile", ""], max_len=4)
    >>> ids.shape, mask.tolist()
    (torch.Size([2, 2]), [[1, 1], [0, 0]])
    """

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``Subwords.encode`` as int64 tensors ``(ids, mask)``, both ``[n, L]``."""
        ids, _ = self.encode(texts, max_len)
        ids_t = torch.from_numpy(ids)
        return ids_t, (ids_t != self.PAD).long()
