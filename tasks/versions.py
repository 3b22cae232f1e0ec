"""The ``code2code-versions`` guard set: a function -> the same function, one release later.

Real near-clones: the same qualified name (``module.Class.method``) in two
pinned releases of one pure-Python package, whose code (docstring removed, as
in every candidate) changed by 20-50% in *normalized token edit distance*:
the Levenshtein distance between the two token sequences (Python tokens
without comments, blank lines or indentation tokens) divided by the longer
sequence's length. Below 20% the pair is a near-copy (a rename, a new
argument); above 50% it is a rewrite that shares little beyond the name.

The query is the older release's code, the gold candidate the newer one's, and
the negatives are the newer release's other functions (BM25 on code tokens plus
random, :mod:`tasks.negatives`). Both sides pass CodeSearchNet's code filters
(3-200 lines, no tests, no boilerplate dunders); a name defined twice in one
module (overloads, platform branches) is ambiguous and left out; pairs are
deduplicated by the normalized code of either side.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tasks.mine import Pair
from tasks.prose import code_functions, parse
from tasks.sources import SourceFile

MIN_DISTANCE = 0.2
MAX_DISTANCE = 0.5
_SKIP_TOKENS = frozenset({tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER, tokenize.ENCODING})


def code_tokens(code: str) -> list[str]:
    """Python tokens of ``code`` without comments, line breaks or indentation tokens.

    >>> code_tokens("def f(x):  # add\\n    return x + 1\\n")
    ['def', 'f', '(', 'x', ')', ':', 'return', 'x', '+', '1']
    """
    try:
        toks = tokenize.generate_tokens(io.StringIO(code).readline)
        return [t.string for t in toks if t.type not in _SKIP_TOKENS]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return code.split()


def levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Edit distance between two token sequences (Myers' bit-parallel algorithm,
    Hyyro's formulation: one pass over ``b`` with ``len(a)``-bit integers).

    >>> levenshtein("kitten", "sitting"), levenshtein([], ["x"]), levenshtein("ab", "ab")
    (3, 1, 0)
    """
    if not a or not b:
        return max(len(a), len(b))
    m = len(a)
    mask, high = (1 << m) - 1, 1 << (m - 1)
    peq: dict[str, int] = {}
    for i, tok in enumerate(a):
        peq[tok] = peq.get(tok, 0) | (1 << i)
    pv, mv, score = mask, 0, m
    for tok in b:
        eq = peq.get(tok, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & mask
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score


def token_distance(old: str, new: str) -> float:
    """Normalized token edit distance of two code texts, in [0, 1]."""
    a, b = code_tokens(old), code_tokens(new)
    return levenshtein(a, b) / max(1, len(a), len(b))


def release_functions(files: Iterable[SourceFile]) -> dict[str, Pair]:
    """``module.qualname`` -> function of one release (names defined twice are dropped)."""
    out: dict[str, Pair] = {}
    twice: set[str] = set()
    for file in files:
        tree = parse(file)
        if tree is None:
            continue
        lines = re.split(r"\r\n|\r|\n", file.text)
        for f in code_functions(file, tree, lines):
            key = f"{f.module}.{f.qualname}"
            if key in out:
                twice.add(key)
            out[key] = replace(f.pair, summary="")
    for key in twice:
        del out[key]
    return out


def mine_versions(old_files: Iterable[SourceFile], new_files: Iterable[SourceFile],
                  low: float = MIN_DISTANCE, high: float = MAX_DISTANCE
                  ) -> tuple[list[Pair], list[Pair], Counter[str]]:
    """(pairs, pool, stats) for one package: see the module docstring.

    Each pair's ``summary`` is the older code (the query), ``code``/``cid`` the
    newer one (the gold), and its other fields say where the newer one lives.
    The pool is every function of the newer release, deduplicated by code.
    """
    old, new = release_functions(old_files), release_functions(new_files)
    stats: Counter[str] = Counter(old_functions=len(old), new_functions=len(new))
    pool: list[Pair] = []
    seen: set[str] = set()
    for pair in new.values():
        if pair.cid not in seen:
            seen.add(pair.cid)
            pool.append(pair)
    pairs: list[Pair] = []
    used: set[str] = set()
    for key in sorted(old.keys() & new.keys()):
        before, after = old[key], new[key]
        if before.cid == after.cid:
            stats["unchanged"] += 1
            continue
        a, b = code_tokens(before.code), code_tokens(after.code)
        longest = max(1, len(a), len(b))
        if abs(len(a) - len(b)) / longest > high:  # a lower bound of the distance
            stats["rejected_too_different"] += 1
            continue
        distance = levenshtein(a, b) / longest
        if distance < low:
            stats["rejected_too_similar"] += 1
        elif distance > high:
            stats["rejected_too_different"] += 1
        elif before.cid in used or after.cid in used:
            stats["duplicate_code"] += 1
        else:
            used.update((before.cid, after.cid))
            pairs.append(replace(after, summary=before.code))
    stats["pairs"], stats["pool"] = len(pairs), len(pool)
    return pairs, pool, stats
