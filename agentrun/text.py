"""Text PostgreSQL cannot store, and JSON it should not be asked to.

PostgreSQL refuses U+0000 in `text` and `jsonb`, and an unpaired surrogate cannot be encoded to
UTF-8 at all. Both reach us from agents that print binary and from clients that fuzz. The rule
(API.md, "Limits and bad input"): in an identifier such a character is a 400 naming the field; in
free content each one is stored as U+FFFD, and an event payload lists what changed in
`sanitizedPaths`.

The JSON parser replaces them as it reads a body, marking each replaced string (key or value) as
a `SanitizedStr`: identifier fields refuse a marked string, and the event path turns the marks
into `sanitizedPaths`. Code that takes text from elsewhere calls `clean` or `sanitize_json`.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# In a JSON body, U+0000 and surrogates can only arrive as \u escapes (a raw NUL or a raw
# surrogate is invalid JSON or invalid UTF-8). No such escape, nothing to replace.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")

# Deeper than this is refused: a payload is data, not a parser stress test, and Python's own JSON
# encoder and PostgreSQL both have recursion limits not far above it.
MAX_JSON_DEPTH = 64

UNSTORABLE_MESSAGE = "contains U+0000 or an unpaired surrogate, which cannot be stored"


class SanitizedStr(str):
    """A string in which U+0000 or unpaired surrogates were replaced by U+FFFD."""

    __slots__ = ()


class TooDeep(ValueError):
    pass


def is_unstorable(text: str) -> bool:
    """True for a string an identifier may not be: it held, or holds, unstorable characters."""
    return isinstance(text, SanitizedStr) or UNSTORABLE.search(text) is not None


def clean(text: str) -> str:
    """`text` with each unstorable character replaced (a `SanitizedStr` when one was)."""
    if UNSTORABLE.search(text) is None:
        return text
    return SanitizedStr(UNSTORABLE.sub(REPLACEMENT, text))


def body_needs_walk(body: bytes) -> bool:
    """Whether a parsed body must be walked: it may hold unstorable text, or be deeper than
    allowed (it has that many brackets at all). Most bodies need neither."""
    if _UNSTORABLE_ESCAPE.search(body) is not None:
        return True
    return body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH


def sanitize_json(value: Any) -> Any:
    """`value` with every unstorable string (key or value, at any depth) cleaned, checking the
    depth on the way. Containers are changed in place; raises `TooDeep`."""
    if isinstance(value, str):
        return clean(value)
    if not isinstance(value, (dict, list)):
        return value
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise TooDeep(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            if any(UNSTORABLE.search(key) for key in node):
                items = [(clean(key), item) for key, item in node.items()]
                node.clear()
                for key, item in items:
                    # Two keys that differ only in unstorable characters: the last one wins,
                    # as with any repeated key in JSON.
                    node[key] = item
            for key, item in node.items():
                if isinstance(item, str):
                    if UNSTORABLE.search(item):
                        node[key] = SanitizedStr(UNSTORABLE.sub(REPLACEMENT, item))
                elif isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
        else:
            for index, item in enumerate(node):
                if isinstance(item, str):
                    if UNSTORABLE.search(item):
                        node[index] = SanitizedStr(UNSTORABLE.sub(REPLACEMENT, item))
                elif isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
    return value
