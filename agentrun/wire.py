"""Wire formats shared by every app: timestamps and query parameters."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from agentrun.errors import AgentRunError, invalid
from agentrun.fields import IDENTIFIER_MAX_LENGTH, check_identifier

_DIGITS = re.compile(r"^[0-9]+$")
# An integer query parameter's text, leading zeros included: longer is not a number we take.
MAX_INTEGER_TEXT = 32


def iso(value: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and `Z`; microseconds are stored, milliseconds sent."""
    if value is None:
        return None
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_iso(value, *, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{field} must be an ISO-8601 timestamp", field=field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"{field} must be an ISO-8601 timestamp", field=field) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # year 1 minus an offset, or year 9999 plus one
        raise invalid(f"{field} is out of range", field=field) from None


def query_int(
    params, name: str, *, default: int, minimum: int, maximum: int | None = None, at_most: int | None = None
) -> int:
    """An integer query parameter: decimal digits only, at least `minimum`, clamped to `maximum`;
    above `at_most` (a seq or version past what a column holds) it is refused."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if text.startswith("-") and _DIGITS.match(text[1:]):
        raise invalid(f"{name} must be an integer of at least {minimum}", parameter=name)
    if len(raw) > MAX_INTEGER_TEXT or not _DIGITS.match(text):
        raise invalid(f"{name} must be an integer", parameter=name)
    value = int(text)
    if value < minimum:
        raise invalid(f"{name} must be an integer of at least {minimum}", parameter=name)
    if at_most is not None and value > at_most:
        raise invalid(f"{name} must be an integer of at most {at_most}", parameter=name, maximum=at_most)
    if maximum is not None:
        value = min(value, maximum)
    return value


def query_wait(params, *, maximum: float) -> float:
    """`wait`: seconds, 0 to the maximum, decimals allowed, larger values clamped."""
    raw = params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise invalid("wait must be a number of seconds", parameter="wait") from None
    if math.isnan(value) or value < 0:
        raise invalid("wait must be a number of seconds from 0 to 30", parameter="wait")
    return min(value, maximum)


def query_identifier(params, name: str, *, max_length: int = IDENTIFIER_MAX_LENGTH) -> str | None:
    """A string query parameter (an id, a reader, a queue, a page token), None when absent or
    empty: the identifier rule (`check_identifier`), a 400 naming the parameter."""
    value = params.get(name) or None
    try:
        check_identifier(value, field=name, max_length=max_length, required=False)
    except AgentRunError as exc:
        exc.details["parameter"] = name
        raise
    return value
