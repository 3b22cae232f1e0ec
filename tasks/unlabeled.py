"""Unlabeled text for the student's query tower, mined from the train groups only.

A query tower distilled from a few thousand docstring summaries learns only that
corner of the teacher's space (``student.extra`` says why more text helps). This
module mines text the teacher can embed without any label, from the same pinned
sources as the splits, and writes it beside them as ``unlabeled.jsonl``:

============ ==================================================================
kind         text
============ ==================================================================
``summary``  docstring summaries of train-pool pairs the query cap left out
``code``     functions (docstring removed) that are not train candidates
``sentence`` docstring sentences after the summary, parameter sections dropped
``name``     function names split into words (``read_json_file`` -> ``read json file``)
``comment``  ``#`` comments of at least ``MIN_WORDS`` words
============ ==================================================================

Leakage rule: only files of **train groups** are read (valid and test are held-out
groups of the same pins, and the guard and online sets are mined from other
pins), and any text equal to a query or candidate of another set is dropped
(``exclude``), so nothing a student is judged on was learnt from. Each kind is
capped per size by a seeded subsample; the file is outside ``data_hash`` (like
``online.jsonl``), so building it invalidates no cache.
"""

from __future__ import annotations

import ast
import io
import json
import random
import re
import tokenize
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from codistill.config import Size
from codistill.subwords import split_identifiers
from tasks.mine import MAX_CODE_LINES, MIN_CODE_LINES, function_code, iter_functions, summarize
from tasks.sources import SourceFile

UNLABELED_FILE = "unlabeled.jsonl"
KINDS = ("summary", "code", "sentence", "name", "comment")
MIN_WORDS = 3
# texts kept per kind; None keeps them all
CAPS: dict[Size, int | None] = {"small": 500, "demo": 6000, "full": 30000}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAM = re.compile(r"^\s*(:param|:type|:return|:rtype|:raises?|args:|arguments:|parameters|"
                    r"returns?:|yields?:|raises:|examples?:|>>>|\.\. )", re.I)


@dataclass(frozen=True)
class Text:
    """One unlabeled text and where it came from."""

    kind: str
    text: str
    group: str


def _words(text: str) -> int:
    return len(re.findall(r"[A-Za-z]{2,}", text))


def docstring_sentences(docstring: str) -> list[str]:
    """Sentences of a docstring after its summary, up to the first parameter section."""
    summary = summarize(docstring)
    rest = docstring.split(summary, 1)[-1] if summary else docstring
    kept: list[str] = []
    for para in re.split(r"\n\s*\n", rest):
        if _PARAM.match(para) or para.lstrip().startswith(("-", "*", "|", "=")):
            break
        flat = " ".join(para.split())
        kept += [s for s in _SENTENCE.split(flat) if _words(s) >= MIN_WORDS]
    return kept


def comments(source: str) -> list[str]:
    """``#`` comments of at least ``MIN_WORDS`` words (pragmas and code left in comments dropped)."""
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if _words(text) >= MIN_WORDS and not text.startswith(("type:", "noqa", "pragma",
                                                                      "pylint", "fmt:")):
                    out.append(text)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def file_texts(file: SourceFile) -> Iterator[Text]:
    """Every candidate text of one file: code, docstring sentences, names, comments."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(file.text)
    except (SyntaxError, ValueError, RecursionError):
        return
    lines = file.text.splitlines()
    for qualname, node in iter_functions(tree):
        name = " ".join(split_identifiers(qualname.rsplit(".", 1)[-1]).split()).lower()
        if _words(name) >= 2 and not qualname.rsplit(".", 1)[-1].startswith("__"):
            yield Text("name", name, file.group)
        code, n_lines = function_code(node, lines)
        if MIN_CODE_LINES <= n_lines <= MAX_CODE_LINES:
            yield Text("code", code, file.group)
        doc = ast.get_docstring(node, clean=True)
        for sentence in docstring_sentences(doc) if doc else []:
            yield Text("sentence", sentence, file.group)
    for comment in comments(file.text):
        yield Text("comment", comment, file.group)


def mine_unlabeled(files: Iterable[SourceFile], train_groups: Iterable[str],
                   summaries: Iterable[str], exclude: Iterable[str], cap: int | None,
                   seed: int) -> tuple[list[Text], dict[str, int]]:
    """Unlabeled texts of the train groups, deduplicated, capped per kind, shuffled.

    Parameters
    ----------
    files : iterable of SourceFile
        The sources the splits were mined from (files of other groups are skipped).
    train_groups : iterable of str
        The train split's groups.
    summaries : iterable of str
        Train-pool summaries that are not train queries (kind ``summary``).
    exclude : iterable of str
        Texts that must not appear (queries and candidates of every other set, and
        the train candidates, which ``code_queries`` already uses).
    cap : int or None
        Texts kept per kind (a seeded subsample); None keeps all.
    seed : int
        Subsample and order seed.

    Returns
    -------
    tuple
        The texts (kinds interleaved in a seeded order) and counts: ``kept_<kind>``,
        ``files``, ``excluded``, ``duplicates``.
    """
    groups, stats = set(train_groups), Counter()
    excluded, seen = {t.strip() for t in exclude}, set()
    by_kind: dict[str, list[Text]] = {k: [] for k in KINDS}

    def add(text: Text) -> None:
        key = text.text.strip()
        if not key:
            return
        if key in excluded:
            stats["excluded"] += 1
            return
        if key in seen:
            stats["duplicates"] += 1
            return
        seen.add(key)
        by_kind[text.kind].append(text)

    for summary in summaries:
        add(Text("summary", summary, "train"))
    for file in files:
        if file.group not in groups:
            continue
        stats["files"] += 1
        for text in file_texts(file):
            add(text)
    rng = random.Random(seed)
    kept: list[Text] = []
    for kind in KINDS:
        texts = by_kind[kind]
        if cap is not None and len(texts) > cap:
            texts = rng.sample(texts, cap)
        stats[f"kept_{kind}"] = len(texts)
        kept += texts
    rng.shuffle(kept)
    return kept, dict(sorted(stats.items()))


def write_unlabeled(path: Path, texts: Iterable[Text]) -> None:
    """One JSON object (``kind``, ``text``, ``group``) per line."""
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"kind": t.kind, "text": t.text, "group": t.group}) + "\n")


def read_unlabeled(path: Path, kinds: Iterable[str] | None = None) -> list[Text]:
    """The texts of ``unlabeled.jsonl`` in file order, optionally of some kinds only."""
    wanted = set(kinds) if kinds is not None else None
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if wanted is None or row["kind"] in wanted:
                out.append(Text(row["kind"], row["text"], row["group"]))
    return out
