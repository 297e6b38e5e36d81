"""Secret redaction for event payloads: values under secret-named keys and secret-looking
substrings become "[REDACTED]", and the JSON Pointers of what changed go in `redactedPaths`.
The same walk stores unstorable text as U+FFFD and lists those strings in `sanitizedPaths`."""

from __future__ import annotations

import re
from typing import Any

from agentrun.text import UNSTORABLE, SanitizedStr, clean, sanitize_json

REDACTED = "[REDACTED]"

# Compared against the key lowercased with "_" and "-" removed.
_SECRET_KEY_SUFFIXES = (
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "credentials",
    "privatekey",
)

# The label between BEGIN and PRIVATE KEY ("", "RSA ", "OPENSSH ", ...) must repeat on the END
# line; an unterminated block is redacted to the end of the string.
_PEM_START = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
_PEM = re.compile(
    r"-----BEGIN (?P<label>(?:[A-Z0-9]+ )*)PRIVATE KEY-----"
    r"[\s\S]*?(?:-----END (?P=label)PRIVATE KEY-----|\Z)"
)

# One alternation so each string is scanned once; the `bearer` group is kept in the output.
_TOKENS_PATTERN = (
    r"(?P<bearer>\b(?i:bearer)\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"
    r"|(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{36,}"
    r"|(?<![A-Za-z0-9])github_pat_[A-Za-z0-9_]{22,}"
    r"|(?<![A-Za-z0-9])xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|\bAKIA[A-Z0-9]{16}\b"
)
_TOKENS = re.compile(_TOKENS_PATTERN)

# Fast path: matches whenever either substitution below would change the string. The leading
# lookahead lists every alternative's first character; it lets `re` skip most positions
# cheaply (about 3x faster on ordinary text) and must be updated with the patterns.
_ANY_SECRET = re.compile(f"(?=[-bBsgxA])(?:{_PEM_START}|{_TOKENS_PATTERN})")


def is_secret_key(key: str) -> bool:
    return key.lower().replace("_", "").replace("-", "").endswith(_SECRET_KEY_SUFFIXES)


def _replace_token(match: re.Match[str]) -> str:
    return (match.group("bearer") or "") + REDACTED


def redact_text(text: str) -> tuple[str, bool]:
    """Replace each secret-looking substring of `text`; returns (new text, changed?)."""
    if _ANY_SECRET.search(text) is None:
        return text, False
    # PEM first: a key block spans lines and may contain base64 that looks like a token.
    new_text = _TOKENS.sub(_replace_token, _PEM.sub(REDACTED, text))
    return new_text, new_text != text


def _pointer(path: tuple[Any, ...]) -> str:
    # RFC 6901: "~" must be escaped before "/" so "~1" in a key is not misread.
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _find_replacements(payload: dict) -> tuple[list[tuple[tuple[Any, ...], Any, bool]], list[tuple[Any, ...]]]:
    """Walk the payload (iteratively, no recursion limit) and list (path, new value, redacted?), and
    the paths of strings whose unstorable text was (or is now) replaced. A key with unstorable
    text that the parser did not clean yet: the payload is cleaned first (in place)."""
    found: list[tuple[tuple[Any, ...], Any, bool]] = []
    sanitized: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), payload)]
    while stack:
        path, node = stack.pop()
        # Only dicts and lists are ever pushed.
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            child_path = (*path, key)
            if isinstance(key, str):
                if isinstance(key, SanitizedStr):
                    sanitized.append(child_path)
                elif UNSTORABLE.search(key):
                    return _find_replacements(sanitize_json(payload))
                if is_secret_key(key):
                    # Already redacted values count as unchanged, so redact() is idempotent.
                    if value != REDACTED:
                        found.append((child_path, REDACTED, True))
                    continue
            if isinstance(value, str):
                if isinstance(value, SanitizedStr):
                    sanitized.append(child_path)
                elif UNSTORABLE.search(value):
                    value = clean(value)
                    sanitized.append(child_path)
                    found.append((child_path, value, False))
                new_value, changed = redact_text(value)
                if changed:
                    found.append((child_path, new_value, True))
            elif isinstance(value, (dict, list)):
                stack.append((child_path, value))
    return found, sanitized


def redact(payload: dict, *, list_sanitized: bool = True) -> dict:
    """Return a redacted copy of `payload` with its unstorable text replaced; the input is not
    mutated (unless it holds keys with unstorable text, which are cleaned in place).

    Containers on the way to a replaced value are copied; untouched nested containers are
    shared with the input. Adds a sorted `redactedPaths` list only when something was redacted,
    and `sanitizedPaths` (unless `list_sanitized` is false: server-emitted events carry exactly
    their own keys) only when text was replaced.
    """
    replacements, sanitized = _find_replacements(payload)
    result = dict(payload)
    if not replacements and not sanitized:
        return result

    # Copy each container on the way to a replaced value once (keyed by the original's id,
    # which stays valid because `payload` keeps every original alive), then assign into it.
    # A string both cleaned and redacted has two replacements; the later one (redacted) wins.
    copies: dict[int, Any] = {id(payload): result}
    redacted = set()
    for path, new_value, is_redaction in replacements:
        original: Any = payload
        node: Any = result
        for key in path[:-1]:
            original = original[key]
            clone = copies.get(id(original))
            if clone is None:
                clone = dict(original) if isinstance(original, dict) else list(original)
                copies[id(original)] = clone
            node[key] = clone
            node = clone
        node[path[-1]] = new_value
        if is_redaction:
            redacted.add(_pointer(path))

    if redacted:
        result["redactedPaths"] = sorted(redacted)
    if sanitized and list_sanitized:
        result["sanitizedPaths"] = sorted({_pointer(path) for path in sanitized})
    return result
