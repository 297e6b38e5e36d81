"""The one request body parser: strict JSON that never hands a view what it cannot store."""

from __future__ import annotations

import json
import math
from typing import NoReturn

from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser

from agentrun.text import MAX_JSON_DEPTH, TooDeep, body_needs_walk, sanitize_json


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400 parses as infinity, which neither JSON nor PostgreSQL can hold.
        raise ValueError(f"number {text[:40]} is out of range")
    return value


class JSONParser(BaseParser):
    """UTF-8 JSON; NaN, Infinity and numbers out of a float's range are refused. Unstorable text
    becomes U+FFFD (marked, see agentrun.text) and nesting past `MAX_JSON_DEPTH` is refused."""

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        body = stream.read() if stream is not None else b""
        try:
            data = json.loads(body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - the body is not UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if body_needs_walk(body):
            try:
                data = sanitize_json(data)
            except TooDeep as exc:
                raise ParseError(f"JSON parse error - {exc}") from None
        return data
