"""Docstring -> function pairs, CodeSearchNet style.

The query is the docstring's first sentence (what a person would type to find
the function); the candidate is the function's source *without* its docstring,
otherwise the gold answer would contain the query verbatim. Filters follow
CodeSearchNet: short summaries, tiny functions, tests and parameter-only
docstrings carry no search signal. Pairs are deduplicated by normalized code
(``candidate_id``) and by summary, keeping the first in source order, so one
text never appears as two golds or as a false negative of itself.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from codistill.ids import candidate_id
from tasks.sources import SourceFile

MIN_SUMMARY_WORDS = 3
MIN_CODE_LINES = 3  # non-blank lines from the ``def`` line on, docstring removed
MAX_CODE_LINES = 200  # huge functions are poor search targets and bloat every candidate list

# Dunders whose docstrings describe real behaviour; the rest (__repr__, __eq__, ...) are
# one-line protocol boilerplate ("Return repr(self)") that only adds noise.
KEPT_DUNDERS = frozenset({"__init__", "__call__", "__new__", "__enter__", "__exit__"})

_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
_PARA_SPLIT = re.compile(r"\n\s*\n")
_ROLE = re.compile(r":[\w.:-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~a.b` -> a.b
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")
_SENTENCE_END = re.compile(r"([.!?])\s+(?=[A-Z(\"'`])")
_ABBREV = frozenset({"e.g", "i.e", "etc", "vs", "cf", "approx", "resp", "no", "mr", "dr", "al"})
_PARAM_START = (
    ":param", ":type", ":return", ":rtype", ":raise", ":arg", ":keyword", ":ivar", ":var",
    "@param", "@return", "@type", "@raise", "args:", "arguments:", "parameters", "params:",
    "param ", "returns:", "return:", "yields:", "raises:", "keyword arguments", "kwargs:",
)
# First paragraphs that point elsewhere instead of saying what the function does.
_NO_SUMMARY_START = ("example", ">>>", "usage:", "note:", "..", "see ", "deprecated")
_PARAM_ANYWHERE = (":param ", ":type ", ":returns:", ":rtype:", "@param ")
_TODO = re.compile(r"^(todo|fixme|xxx|hack|tbd|placeholder|not implemented|stub|dummy)\b", re.I)
_URL = re.compile(r"https?://|www\.|\bftp://", re.I)
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->|<==>|$)")


@dataclass(frozen=True)
class Pair:
    """One mined (query, code) pair and where it came from."""

    summary: str
    code: str
    cid: str  # candidate_id(code)
    source: str
    module: str
    path: str
    name: str  # qualified name, e.g. "Class.method"
    group: str
    lineno: int


@dataclass
class MineResult:
    pairs: list[Pair]
    stats: Counter[str] = field(default_factory=Counter)


def summarize(docstring: str) -> str:
    """First sentence of the first paragraph, whitespace-collapsed, reST markup and
    trailing ``.``/``:`` stripped (always stripped, so queries look alike)."""
    para = _PARA_SPLIT.split(docstring.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    for m in _SENTENCE_END.finditer(text):
        before = text[: m.start()].rsplit(" ", 1)[-1].lower()
        if m.group(1) == "." and (before in _ABBREV or len(before) == 1):
            continue
        text = text[: m.start() + 1]
        break
    return text.rstrip(" .:;,")


def reject_summary(summary: str) -> str | None:
    """Why a summary is not a usable query, or None if it is."""
    low = summary.lower()
    if len(summary.split()) < MIN_SUMMARY_WORDS:
        return "short_summary"
    if low.startswith(_PARAM_START) or any(p in low for p in _PARAM_ANYWHERE):
        return "param_doc"
    if low.startswith(_NO_SUMMARY_START):
        return "no_summary"
    if _URL.search(summary):
        return "url"
    if _TODO.match(low):
        return "todo"
    if _SIGNATURE.match(summary):
        return "signature"
    letters = sum(c.isascii() and c.isalpha() for c in summary)
    if letters < 0.6 * len(summary.replace(" ", "")):
        return "not_prose"
    return None


def reject_name(qualname: str) -> str | None:
    """Why a function is excluded by name: tests and boilerplate dunders."""
    if any(part.lower().startswith("test") for part in qualname.split(".")):
        return "test_function"
    short = qualname.rsplit(".", 1)[-1]
    if short.startswith("__") and short.endswith("__") and short not in KEPT_DUNDERS:
        return "dunder"
    return None


Function = ast.FunctionDef | ast.AsyncFunctionDef


def iter_functions(tree: ast.Module) -> Iterator[tuple[str, Function]]:
    """Module-level functions and (nested-class) methods in source order; functions
    nested in functions are part of their parent's code, not pairs of their own."""

    def visit(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, Function]]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + node.name, node
            elif isinstance(node, ast.ClassDef):
                yield from visit(node.body, f"{prefix}{node.name}.")

    yield from visit(tree.body, "")


def _col(line: str, byte_offset: int) -> int:
    """ast columns are UTF-8 byte offsets; convert to a str index."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def function_code(node: Function, lines: list[str]) -> tuple[str, int]:
    """Source of ``node`` with decorators, without its docstring, dedented to column 0.

    Returns the code and its number of non-blank lines from the ``def`` line on.
    Dedent removes exactly the ``def``'s indentation (not textwrap's common prefix),
    so multi-line string literals at column 0 inside a method do not block it.
    """
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    end = node.end_lineno or node.lineno
    doc = node.body[0] if node.body else None
    has_doc = (
        isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    )
    out: list[tuple[int, str]] = []
    skip_blank_after_doc = False
    for lineno in range(start, end + 1):
        line = lines[lineno - 1]
        if has_doc and doc.lineno <= lineno <= (doc.end_lineno or doc.lineno):
            kept = ""
            if lineno == doc.lineno:
                kept += line[: _col(line, doc.col_offset)]
            if lineno == doc.end_lineno:
                kept += line[_col(line, doc.end_col_offset or 0):]
            skip_blank_after_doc = True
            if kept.strip() in ("", ";"):
                continue
            line = kept.rstrip()
        elif skip_blank_after_doc and not line.strip():
            continue
        else:
            skip_blank_after_doc = False
        out.append((lineno, line))
    indent = node.col_offset
    dedented = []
    for _, line in out:
        lead = len(line) - len(line.lstrip(" \t"))
        dedented.append(line[min(lead, indent):].rstrip())
    n_lines = sum(1 for (lineno, line) in out if lineno >= node.lineno and line.strip())
    return "\n".join(dedented).strip("\n"), n_lines


def extract(file: SourceFile, stats: Counter[str] | None = None) -> list[Pair]:
    """All pairs of one file that pass the filters (dedupe happens in :func:`mine`)."""
    stats = stats if stats is not None else Counter()
    stats["files"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for invalid escapes in old code
            tree = ast.parse(file.text)
    except (SyntaxError, ValueError, RecursionError):
        stats["unparsable_files"] += 1
        return []
    lines = _LINE_SPLIT.split(file.text)
    pairs = []
    for qualname, node in iter_functions(tree):
        stats["functions"] += 1
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        stats["documented"] += 1
        summary = summarize(docstring)
        reason = reject_name(qualname) or reject_summary(summary)
        if reason is None:
            code, n_lines = function_code(node, lines)
            if n_lines < MIN_CODE_LINES:
                reason = "short_code"
            elif n_lines > MAX_CODE_LINES:
                reason = "long_code"
        if reason is not None:
            stats[f"rejected_{reason}"] += 1
            continue
        pairs.append(Pair(
            summary, code, candidate_id(code), file.source, file.module, file.path,
            qualname, file.group, node.lineno,
        ))
    return pairs


def mine(files: Iterable[SourceFile], progress: bool = False) -> MineResult:
    """Extract, filter and deduplicate pairs from ``files`` (kept in iteration order).

    Sequential on purpose: parsing is fast, and a process pool spends what it would
    gain on reading and pickling the files.
    """
    result = MineResult(pairs=[])
    seen_code: set[str] = set()
    seen_summary: set[str] = set()
    for file in tqdm(files, desc="mine", unit=" files", disable=not progress):
        for pair in extract(file, result.stats):
            key = pair.summary.lower()
            if pair.cid in seen_code:
                result.stats["duplicate_code"] += 1
            elif key in seen_summary:
                result.stats["duplicate_summary"] += 1
            else:
                seen_code.add(pair.cid)
                seen_summary.add(key)
                result.pairs.append(pair)
    result.stats["pairs"] = len(result.pairs)
    return result
