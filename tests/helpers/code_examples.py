"""Six tiny code-search examples (query -> the function it describes) for teacher tests."""

from __future__ import annotations

from codistill.ranking import RankingExample

CODE = {
    "add": "def add(a, b):\n    total = a + b\n    return total",
    "read": "def read_text(path):\n    with open(path, encoding='utf-8') as fh:\n        return fh.read()",
    "sort": "def sort_desc(items):\n    items = list(items)\n    return sorted(items, reverse=True)",
    "mkdir": "def ensure_dir(path):\n    import os\n    os.makedirs(path, exist_ok=True)\n    return path",
    "json": "def load_json(path):\n    import json\n    with open(path) as fh:\n        return json.load(fh)",
    "upper": "def shout(text):\n    text = text.strip()\n    return text.upper() + '!'",
}
QUERIES = {
    "add": "return the sum of two numbers",
    "read": "read a text file and return its contents",
    "sort": "sort items in descending order",
    "mkdir": "create a directory if it does not exist",
    "json": "parse a json file",
    "upper": "convert a string to upper case",
}


def examples() -> list[RankingExample]:
    keys = list(CODE)
    return [
        RankingExample(query=QUERIES[k], candidates=[CODE[c] for c in keys], labels=[int(c == k) for c in keys])
        for k in keys
    ]
