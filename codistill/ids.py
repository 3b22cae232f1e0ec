"""Content-derived identifiers.

Candidates are identified by a hash of their *normalized* code so the same
function mined twice (or supplied by a user with different indentation or
trailing blanks) gets one id, one embedding and one store entry. Queries are
identified by a hash of their text when the user gives no id.
"""

from __future__ import annotations

import hashlib
import re
import textwrap

_WS = re.compile(r"[ \t]+")

ID_HEX_CHARS = 16  # 64 bits: collision-free in practice for corpora below ~10^8 items


def normalize_code(code: str) -> str:
    r"""Normalize code for hashing and deduplication.

    Dedent, drop blank lines and trailing whitespace, collapse runs of spaces and
    tabs: formatting-only differences must not create new candidates.

    >>> normalize_code("    def f(x):\n\n        return  x   \n")
    'def f(x):\n    return x'
    """
    code = textwrap.dedent(code.replace("\r\n", "\n").replace("\r", "\n"))
    lines = (_WS.sub(" ", line.rstrip()) for line in code.split("\n"))
    return "\n".join(line for line in lines if line.strip())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def candidate_id(code: str) -> str:
    r"""Mandatory candidate id: ``c`` + hash of the normalized code.

    >>> candidate_id("def f():\n    pass") == candidate_id("  def f():\n      pass  \n")
    True
    """
    return "c" + _digest(normalize_code(code))


def query_id(query: str) -> str:
    """Default query id: ``q`` + hash of the whitespace-normalized query text."""
    return "q" + _digest(" ".join(query.split()))


def text_hash(text: str) -> str:
    """Exact-text hash used as an embedding-cache key (no normalization: the
    encoder sees the exact text, so the cache must too)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
