"""Lexical text helpers shared by every stage: identifier sub-words and a quiet BM25.

BM25 negatives (``tasks``) and the BM25 baseline (``student.baselines``) must
tokenise exactly alike, or the baseline would not be the ranker the hard
negatives were mined against; so the tokenizer lives here, below both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from bm25s.stopwords import STOPWORDS_EN

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBWORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*|[0-9]+")
_STOP = frozenset(STOPWORDS_EN)


@contextmanager
def quiet_bm25s() -> Iterator[None]:
    """Silence bm25s's per-index DEBUG/INFO log lines (noise in every build and evaluation)."""
    logger = logging.getLogger("bm25s")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def subword_tokens(text: str) -> list[str]:
    """Identifier sub-words, lowercased: ``parseHTTPHeader_v2`` -> parse, http, header, v2.

    The same tokenizer serves docstrings and code so that ``read_file`` in code
    matches "read a file" in a query. Digits stay on the word they follow
    (``sha256``, ``utf8``); one-letter pieces and English stopwords carry no
    retrieval signal and are dropped.

    >>> subword_tokens("def parseHTTPHeader_v2(raw): return a sha256 of it")
    ['def', 'parse', 'http', 'header', 'v2', 'raw', 'return', 'sha256']
    """
    out = []
    for ident in _IDENT.findall(text):
        for part in ident.split("_"):
            for sub in _SUBWORD.findall(part):
                low = sub.lower()
                if len(low) > 1 and low not in _STOP:
                    out.append(low)
    return out
