"""Event payloads on the wire: encoded once, as sent, and shortened to the API's size limit.

The API measures a payload as its compact UTF-8 JSON and refuses one over 256 KiB (API.md, "Limits
and bad input"). An agent can print far more than that in one command, so the runner shortens such
a payload before sending it: its longest strings keep their head and tail around `…[N bytes cut]…`,
and `truncatedBytes` says how many bytes were cut in all. Everything else in the payload is kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

from runner.records import JsonObject

MAX_PAYLOAD_BYTES = 256 * 1024
MAX_CHARACTER_BYTES = 12  # the most one character takes in JSON: an astral one written as two escapes
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)  # made once: it is called a lot


def json_bytes(value: object) -> bytes:
    """Compact UTF-8 JSON, exactly as the runner sends it (and measures it).

    A lone surrogate (a CLI may print `"\\udc80"`) has no UTF-8 form: it goes as a `\\u` escape,
    which is still valid JSON, and the server stores it as U+FFFD. NaN and infinities, which
    Python's JSON reader accepts but JSON has no word for, go as strings.
    """
    try:
        text = _ENCODER.encode(value)
    except ValueError:
        return json_bytes(_finite(value))
    # Only a surrogate has no UTF-8 form, and only inside a string, where Python's `\\udc80`
    # is the JSON escape too.
    return text.encode("utf-8", "backslashreplace")


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8, a lone surrogate counted as the three bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))


def cut_marker(cut_bytes: int) -> str:
    return f"…[{cut_bytes} bytes cut]…"


def cut_string(text: str, budget: int) -> tuple[str, int]:
    """`text` kept to at most `budget` bytes of JSON (its quotes included) when it is longer: its
    head and tail, as much of each as fits, around the marker. Returns (the string, bytes cut).

    A budget below the bare marker's size still leaves the marker: a cut must stay visible.
    """
    size = len(json_bytes(text))
    if size <= budget:
        return text, 0
    total = utf8_length(text)

    def kept(keep: int) -> tuple[str, int, int]:
        head, tail = text[:keep], text[len(text) - keep :]
        cut = total - utf8_length(head) - utf8_length(tail)
        result = head + cut_marker(cut) + tail
        return result, cut, budget - len(json_bytes(result))

    # Start from the text's average cost per character and correct by what the result overshoots:
    # a character fewer at each end saves at least two bytes. Then use what room is left: a
    # character more at each end costs at most 2 x 12 bytes (an astral one as escapes), and the
    # marker only shrinks as less is cut.
    per_character = (size - 2) / len(text)
    keep = max(0, min(len(text) // 2, int((budget - len(json_bytes(cut_marker(total)))) / (2 * per_character))))
    result, cut, slack = kept(keep)
    while slack < 0 and keep > 0:
        keep = max(0, keep - max(1, math.ceil(-slack / 2)))
        result, cut, slack = kept(keep)
    while slack >= 2 * MAX_CHARACTER_BYTES and keep < len(text) // 2:
        keep = min(len(text) // 2, keep + slack // (2 * MAX_CHARACTER_BYTES))
        result, cut, slack = kept(keep)
    return result, cut


def shorten(payload: JsonObject, limit: int = MAX_PAYLOAD_BYTES) -> JsonObject:
    """`payload` itself when its JSON fits in `limit` bytes; else a copy that fits, with
    `truncatedBytes`: the UTF-8 bytes cut (added to a count the payload already had).

    The longest strings are cut first and evenly: every string longer than a common cap is cut to
    it, the cap found by filling the room the rest of the payload leaves. Keys, numbers and short
    strings are kept. A payload that does not fit even with its strings cut to bare markers (a list
    of many small values) is replaced by its own JSON text, cut the same way, as `truncatedPayload`.
    """
    size = len(json_bytes(payload))
    if size <= limit:
        return payload
    earlier = payload.get("truncatedBytes")
    earlier = earlier if isinstance(earlier, int) and not isinstance(earlier, bool) and earlier > 0 else 0
    sizes = sorted((len(json_bytes(text)) for text in _strings(payload)), reverse=True)
    # Room for the strings once everything else, and the count of bytes cut, is written.
    room = limit - (size - sum(sizes)) - len(json_bytes({"truncatedBytes": size + earlier}))
    cap, capped = _water_level(sizes, room)
    floor = len(json_bytes(cut_marker(size)))
    while capped and cap >= floor:
        candidate = _capped(payload, cap, earlier)
        excess = len(json_bytes(candidate)) - limit
        if excess <= 0:
            return candidate
        cap -= max(1, math.ceil(excess / capped))
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
    overhead = len(json_bytes({"truncatedPayload": "", "truncatedBytes": utf8_length(text) + earlier}))
    kept, cut = cut_string(text, limit - overhead + 2)
    return {"truncatedPayload": kept, "truncatedBytes": cut + earlier}


def _water_level(sizes: list[int], room: int) -> tuple[int, int]:
    """The largest cap such that the strings (`sizes`, longest first) cut to it fill at most
    `room` bytes, and how many strings it cuts."""
    rest = sum(sizes)
    for count, longest in enumerate(sizes, start=1):
        rest -= longest
        cap = (room - rest) // count  # the `count` longest at `cap`, the others whole
        following = sizes[count] if count < len(sizes) else 0
        if cap >= following:
            return min(cap, longest), count
    return 0, len(sizes)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _capped(payload: JsonObject, cap: int, earlier: int) -> JsonObject:
    """A copy of `payload` with every string over `cap` bytes of JSON cut to it, and the count."""
    cut_total = 0

    def walk(value: object) -> object:
        nonlocal cut_total
        if isinstance(value, str):
            kept, cut = cut_string(value, cap)
            cut_total += cut
            return kept
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [walk(item) for item in value]
        return value

    shortened = {key: walk(item) for key, item in payload.items()}
    shortened["truncatedBytes"] = cut_total + earlier
    return shortened
