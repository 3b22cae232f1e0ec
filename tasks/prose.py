"""The ``nl2code-prose`` guard set: usage prose -> the function it names.

Training queries are the first sentence of a function's *own* docstring. This
set asks the same question (find the code) from text written elsewhere, for
readers of a package rather than of one function: module and class docstrings,
the long description in ``*.dist-info/METADATA`` and ``README``/docs files
(``.md``, ``.rst``, ``.txt``) shipped inside the wheel.

Pairing rule
------------
Prose is cut into units: one sentence of a paragraph, or one item of a list or
definition list (``- name(x): ...``, ``name(x) -- ...``). Code blocks, doctest
lines and headings are dropped. A unit is paired with function ``F`` iff

* it *mentions* exactly one function of the same source (pinned wheel, or stdlib
  top-level module), as ``name(``, ```name```, ````name```` or ``:func:`a.name```;
  a dotted mention (``Class.name``, ``module.name``) must match ``F``'s
  qualified name or module path, a bare one must name exactly one function of
  the source (in a module docstring, of that module first);
* the unit, markup removed, has >= 3 words besides the mention and passes the
  training queries' summary filters (no parameter docs, URLs, TODOs, ...);
* it is not ``F``'s own docstring summary (that is training-style text).

``F`` passes CodeSearchNet's code filters (>= 3 and <= 200 lines without the
docstring, no test paths or test functions, no boilerplate dunders). Pairs are
deduplicated by normalized code (one query per function: the first unit in
source order, METADATA and docs files after the Python files) and by query.
The candidate pool is every such function of the guard's sources, documented
or not.
"""

from __future__ import annotations

import ast
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath

from codistill.ids import candidate_id
from tasks.mine import (
    MAX_CODE_LINES,
    MIN_CODE_LINES,
    MIN_SUMMARY_WORDS,
    Pair,
    function_code,
    iter_functions,
    reject_name,
    reject_summary,
    summarize,
)
from tasks.packages import Pin
from tasks.sources import SourceFile, is_test_path

MAX_PROSE_WORDS = 60
MIN_NAME_CHARS = 4  # bare mentions shorter than this (`get`, `run`) are too ambiguous
PROSE_SUFFIXES = (".md", ".rst", ".txt")
_SKIP_DOC_NAMES = ("license", "licence", "copying", "authors", "notice", "entry_points",
                   "top_level", "requires", "sources", "dependency_links", "record", "wheel")


@dataclass(frozen=True)
class ProseText:
    """One piece of prose: where it comes from and the module it belongs to (if any)."""

    source: str
    group: str
    origin: str  # "module:<path>", "class:<path>:<Class>", "metadata", "doc:<path>"
    module: str | None
    text: str


# ---------------------------------------------------------------- reading prose


def wheel_prose(wheel: Path, pin: Pin) -> Iterator[ProseText]:
    """The METADATA long description and README/docs text files of a wheel."""
    source, group = pin.requirement, f"pypi:{pin.name}"
    with zipfile.ZipFile(wheel) as zf:
        for rel in sorted(n for n in zf.namelist() if not n.endswith("/")):
            parts = PurePosixPath(rel).parts
            low = parts[-1].lower()
            if len(parts) == 2 and parts[0].endswith(".dist-info") and low == "metadata":
                raw = zf.read(rel).decode("utf-8", errors="replace")
                msg = HeaderParser().parsestr(raw)
                body = msg.get_payload() or msg.get("Description") or ""
                if isinstance(body, str) and body.strip():
                    yield ProseText(source, group, "metadata", None, body)
            elif (low.endswith(PROSE_SUFFIXES) and not is_test_path(rel)
                  and not low.startswith(_SKIP_DOC_NAMES)
                  and not parts[0].endswith((".dist-info", ".data"))):
                text = zf.read(rel).decode("utf-8", errors="replace")
                yield ProseText(source, group, f"doc:{rel}", None, text)


def docstring_prose(file: SourceFile, tree: ast.Module) -> Iterator[ProseText]:
    """The module docstring and every class docstring of a parsed file."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield ProseText(file.source, file.group, f"module:{file.path}", file.module, doc)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                origin = f"class:{file.path}:{node.name}"
                yield ProseText(file.source, file.group, origin, file.module, doc)


# ---------------------------------------------------------------- prose units

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_PARA = re.compile(r"\n\s*\n")
_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)]|#\.)\s+")
_DEF_ITEM = re.compile(r"^\s*[`:\w.]+(?:\([^)]*\))?`*\s+(?:--|-|:|\u2014)\s+\S")
_HEADING_RULE = re.compile(r"^\s*([=\-~^*#+`'\".])\1{2,}\s*$")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_ROLE = re.compile(r":[\w.:-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")
_SENTENCE_END = re.compile(r"([.!?])\s+(?=[A-Z(\"'`:])")
_ABBREV = frozenset({"e.g", "i.e", "etc", "vs", "cf", "approx", "resp", "no", "al"})
_MENTION = re.compile(
    r":[\w.:-]+:`~?!?(?P<role>[\w.]+)(?:\(\))?`"  # :func:`pkg.name`
    r"|``(?P<dlit>[\w.]+)(?:\([^`]*\))?``"  # ``name`` / ``name(x)``
    r"|`(?P<lit>[\w.]+)(?:\([^`]*\))?`"  # `name` / `name(x)`
    r"|[CL]\{(?P<epy>[\w.]+)(?:\([^}]*\))?\}"  # epytext C{name()} / L{name}
    r"|(?<![\w.])(?P<call>[A-Za-z_][\w.]*)\("  # name(
)
_EPYTEXT = re.compile(r"[CLIBU]\{([^{}]*)\}")


def _clean_block(text: str) -> list[str]:
    """Paragraphs of ``text`` that are prose: fenced and indented code, doctests,
    directives and heading rules removed."""
    text = _FENCE.sub("\n", text.replace("\r\n", "\n").replace("\t", "    "))
    out = []
    for para in _PARA.split(text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or lines[0].startswith("    ") or lines[0].lstrip().startswith("|"):
            continue  # an indented (literal) block or a table
        kept = [ln for ln in lines if not ln.lstrip().startswith(
            (">>>", "...", "$ ", ".. ", "#", "<", "|", "+-", "=="))
            and not _HEADING_RULE.match(ln)]
        if kept:
            out.append("\n".join(kept))
    return out


def _sentences(text: str) -> list[str]:
    """Split a paragraph into sentences (the training summary's sentence rule)."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        before = text[start : m.start()].rsplit(" ", 1)[-1].lower()
        if m.group(1) == "." and (before in _ABBREV or len(before) == 1):
            continue
        out.append(text[start : m.start() + 1])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def prose_units(text: str) -> Iterator[str]:
    """Units of prose: list items (with their continuation lines) and sentences."""
    for para in _clean_block(text):
        lines = para.split("\n")
        if any(_ITEM.match(ln) or _DEF_ITEM.match(ln) for ln in lines):
            items: list[list[str]] = []
            for ln in lines:
                if _ITEM.match(ln) or _DEF_ITEM.match(ln) or not items:
                    items.append([_ITEM.sub("", ln, count=1)])
                else:
                    items[-1].append(ln)
            for item in items:
                yield " ".join(" ".join(item).split())
        else:
            yield from _sentences(para)


def mentions(unit: str) -> list[str]:
    """Dotted names the unit refers to as code (first-seen order, no repeats).

    A call (``name(``), a dotted name or a role always counts; a bare literal
    (```name```) only if it looks like an identifier (an ``_`` or an inner
    capital): ```type``` or ```step``` is far more often a parameter than a function.
    """
    names: list[str] = []
    for m in _MENTION.finditer(unit):
        name = (m.group("role") or m.group("dlit") or m.group("lit") or m.group("epy")
                or m.group("call") or "").strip(".")
        strong = m.group("role") or m.group("call") or "(" in m.group(0) or "." in name
        if not strong and not ("_" in name.strip("_") or any(c.isupper() for c in name[1:])):
            continue
        if name and name not in names:
            names.append(name)
    return names


def clean_unit(unit: str) -> str:
    """Markup removed (links, roles, literals, emphasis), whitespace collapsed."""
    text = _MD_LINK.sub(lambda m: m.group(1), unit)
    text = _RST_LINK.sub(lambda m: m.group(1), text)
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _EMPH.sub(lambda m: m.group(1), text)
    text = _EPYTEXT.sub(lambda m: m.group(1), text)
    return " ".join(text.split()).strip(" .:;,")


# ---------------------------------------------------------------- functions


@dataclass(frozen=True)
class CodeFunction:
    """A function that passes the code filters, with its own docstring summary."""

    pair: Pair  # summary = its own docstring summary ("" if none)
    qualname: str
    module: str


def code_functions(file: SourceFile, tree: ast.Module, lines: list[str]
                   ) -> Iterator[CodeFunction]:
    """Functions of one parsed file that pass CodeSearchNet's code filters."""
    for qualname, node in iter_functions(tree):
        if reject_name(qualname):
            continue
        code, n_lines = function_code(node, lines)
        if not MIN_CODE_LINES <= n_lines <= MAX_CODE_LINES:
            continue
        doc = ast.get_docstring(node, clean=True)
        pair = Pair(summarize(doc) if doc else "", code, candidate_id(code), file.source,
                    file.module, file.path, qualname, file.group, node.lineno)
        yield CodeFunction(pair, qualname, file.module)


def parse(file: SourceFile) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(file.text)
    except (SyntaxError, ValueError, RecursionError):
        return None


class _Index:
    """Functions of one source, looked up by mention."""

    def __init__(self, funcs: Sequence[CodeFunction]) -> None:
        self.by_short: dict[str, list[CodeFunction]] = {}
        for f in funcs:
            self.by_short.setdefault(f.qualname.rsplit(".", 1)[-1], []).append(f)

    def resolve(self, name: str, module: str | None) -> CodeFunction | None:
        short = name.rsplit(".", 1)[-1]
        found = self.by_short.get(short, [])
        if "." in name:
            found = [f for f in found if f.qualname == name
                     or f"{f.module}.{f.qualname}".endswith("." + name)]
        elif len(short) < MIN_NAME_CHARS:
            return None
        if len(found) > 1 and module is not None:
            local = [f for f in found if f.module == module]
            found = local or found
        return found[0] if len(found) == 1 else None


_CODE_LIKE = re.compile(r"\w\s*=\s*[\w'\"(\[{]|[{};]\s*$|^\s*(?:def|class|import|from|return)\s")


def reject_prose(unit: str, query: str, mention: str, func: CodeFunction) -> str | None:
    """Why a unit is not a usable query for ``func``, or None."""
    if _CODE_LIKE.search(unit):
        return "code_like"
    if unit.lstrip().startswith("@") or "@ivar" in unit:
        return "field_doc"
    words = [w for w in query.split() if mention.rsplit(".", 1)[-1] not in w]
    if len(words) < MIN_SUMMARY_WORDS:
        return "short_prose"
    if len(query.split()) > MAX_PROSE_WORDS:
        return "long_prose"
    reason = reject_summary(query)
    if reason not in (None, "signature"):
        return reason
    own = func.pair.summary.lower().strip(" .")
    if own and (own == query.lower() or own in query.lower()):
        return "own_docstring"
    return None


def mine_prose(files: Iterable[SourceFile], texts: Iterable[ProseText] = ()
               ) -> tuple[list[Pair], list[Pair], Counter[str]]:
    """(pairs, candidate pool, stats): see the module docstring for the rule.

    ``files`` are the sources' Python files (function index, module and class
    docstrings); ``texts`` their other prose (METADATA, docs files).
    """
    stats: Counter[str] = Counter()
    funcs: dict[str, list[CodeFunction]] = {}
    prose: list[ProseText] = []
    for file in files:
        stats["files"] += 1
        tree = parse(file)
        if tree is None:
            stats["unparsable_files"] += 1
            continue
        lines = re.split(r"\r\n|\r|\n", file.text)
        funcs.setdefault(file.group, []).extend(code_functions(file, tree, lines))
        prose.extend(docstring_prose(file, tree))
    prose.extend(texts)
    pool: list[Pair] = []
    seen_pool: set[str] = set()
    for fs in funcs.values():
        for f in fs:
            if f.pair.cid not in seen_pool:
                seen_pool.add(f.pair.cid)
                pool.append(replace(f.pair, summary=""))
    indexes = {group: _Index(fs) for group, fs in funcs.items()}
    pairs: list[Pair] = []
    seen_code: set[str] = set()
    seen_query: set[str] = set()
    for text in prose:
        index = indexes.get(text.group)
        if index is None:
            continue
        stats[f"prose_{text.origin.split(':', 1)[0]}"] += 1
        for unit in prose_units(text.text):
            stats["units"] += 1
            resolved = {}
            for name in mentions(unit):
                func = index.resolve(name, text.module)
                if func is not None:
                    resolved.setdefault(func.pair.cid, (name, func))
            if len(resolved) != 1:
                stats["no_mention" if not resolved else "several_mentions"] += 1
                continue
            ((name, func),) = resolved.values()
            query = clean_unit(unit)
            reason = reject_prose(unit, query, name, func)
            if reason is None and func.pair.cid in seen_code:
                reason = "duplicate_code"
            if reason is None and query.lower() in seen_query:
                reason = "duplicate_query"
            if reason is not None:
                stats[f"rejected_{reason}"] += 1
                continue
            seen_code.add(func.pair.cid)
            seen_query.add(query.lower())
            pairs.append(replace(func.pair, summary=query))
    stats["pairs"], stats["pool"] = len(pairs), len(pool)
    return pairs, pool, stats
