"""Durations as operators type them on the command line: `30d`, `12h`, `90m`, `45s`, `2w`, or
a number of seconds."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_duration(text: str) -> timedelta:
    """A positive duration; ValueError for anything else."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use a number and s, m, h, d or w (30d, 12h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0 or seconds > 100 * 365 * 86400:
        raise ValueError(f"{text!r} must be more than 0 and at most 100 years")
    return timedelta(seconds=seconds)


def duration_argument(text: str) -> timedelta:
    """parse_duration for argparse: a bad value is a usage error naming the option."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
