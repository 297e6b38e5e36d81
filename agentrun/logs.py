"""Logs: structlog over the standard `logging`, so agentrun's lines, Django's, gunicorn's and
uvicorn's come out the same way: one JSON object per line (`AGENTRUN_LOG_FORMAT=json`, the
default) or readable columns for a person (`console`, what `make run` sets).

Each line carries what is known of its request: `request_id` (the client's `X-Request-ID`, or
minted), `tenant_id` and `run_id` or `session_id`, bound in contextvars by the request's
middleware (agentrun.middleware.RequestContextMiddleware) and by the server for its access line.

No secret reaches a log: every field is redacted by the same rules as event payloads
(agentrun.redaction: secret-named keys, tokens, private keys), and the passwords of DSNs
(`postgresql://user:password@host`, `password=...`) too.

Imported by settings: it must not import Django models.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import structlog
from structlog.types import EventDict

from agentrun.redaction import REDACTED, is_secret_key, redact_text

JSON, CONSOLE = "json", "console"

# `scheme://user:password@` and libpq's `password=...` (a keyword/value DSN or a query string).
_DSN_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)")
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)\s*=\s*)(?:'[^']*'|\"[^\"]*\"|[^\s&;,]+)", re.I)


def redact_log_text(text: str) -> str:
    text = redact_text(text)[0]
    if "://" in text:
        text = _DSN_PASSWORD.sub(lambda match: match.group("head") + REDACTED, text)
    if "=" in text:
        text = _KEYWORD_PASSWORD.sub(lambda match: match.group("head") + REDACTED, text)
    return text


def _redact_value(value: Any, depth: int = 0) -> Any:
    """A field's value, redacted. What is not JSON (a request object, an exception) and what is
    nested too deep is rendered as text first, so its text is redacted too."""
    if isinstance(value, str):
        return redact_log_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > 8 or not isinstance(value, (dict, list, tuple)):
        return redact_log_text(str(value))
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(key, str) and is_secret_key(key) else _redact_value(item, depth + 1)
            for key, item in value.items()
        }
    return [_redact_value(item, depth + 1) for item in value]


def redact_fields(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Every field of the line, its message and formatted exception too."""
    for key, value in list(event_dict.items()):
        if key.startswith("_"):  # the formatter's own (the stdlib record)
            continue
        if is_secret_key(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


def _uvicorn_access(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """uvicorn's access line as fields: client, method, path, status (its message stays). A
    standard record's arguments are passed as `positional_args` for this, and dropped, as is
    uvicorn's coloured copy of its message."""
    args = event_dict.pop("positional_args", None)
    event_dict.pop("color_message", None)  # uvicorn's message again, with terminal colours
    record = event_dict.get("_record")
    if record is not None and record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        client, method, path, _version, status = args
        event_dict.update(client=client, method=method, path=path, status=status)
    return event_dict


def _shared() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def log_format() -> str:
    value = os.environ.get("AGENTRUN_LOG_FORMAT", JSON).strip().lower()
    return CONSOLE if value == CONSOLE else JSON


def formatter(fmt: str | None = None) -> dict:
    """A `logging` dictConfig formatter entry rendering every record (structlog's and the
    standard library's) as `fmt`."""
    fmt = fmt or log_format()
    renderer = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == CONSOLE
        else structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
    )
    return {
        "()": structlog.stdlib.ProcessorFormatter,
        "pass_foreign_args": True,
        "foreign_pre_chain": [*_shared(), structlog.stdlib.ExtraAdder()],
        "processors": [
            _uvicorn_access,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_fields,
            renderer,
        ],
    }


def configure() -> None:
    """structlog's own loggers hand their events to `logging` (and so to the formatter above)."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def logging_config(*, level: str | None = None, fmt: str | None = None, access_file: str | None = None) -> dict:
    """The `LOGGING` of settings, and gunicorn's `logconfig_dict`: one handler on stderr with the
    formatter, for the root logger and for Django's, gunicorn's and uvicorn's own loggers; the
    access lines go to `access_file` instead when one is given."""
    level = level or os.environ.get("AGENTRUN_LOG_LEVEL", "INFO")
    handlers: dict[str, dict] = {"console": {"class": "logging.StreamHandler", "formatter": "agentrun"}}
    quiet = {"level": "WARNING"}
    own = {"handlers": ["console"], "propagate": False}
    access = {**own, "level": "INFO"}
    if access_file:
        handlers["access"] = {"class": "logging.FileHandler", "filename": access_file, "formatter": "agentrun"}
        access["handlers"] = ["access"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"agentrun": formatter(fmt)},
        "handlers": handlers,
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "pgserver": quiet,
            # Django's own handlers (its console in DEBUG, mail_admins) give way to ours.
            "django": {**own, "level": "INFO"},
            "django.server": {**own, "level": "INFO"},
            "gunicorn.error": {**own, "level": level},
            "gunicorn.access": access,
            "uvicorn.error": {**own, "level": level},
            "uvicorn.access": access,
        },
    }


def bind(**fields: Any) -> None:
    """Add fields to every line of this request (this context) from now on."""
    structlog.contextvars.bind_contextvars(**{key: value for key, value in fields.items() if value is not None})


def clear() -> None:
    structlog.contextvars.clear_contextvars()


def bound() -> dict[str, Any]:
    return structlog.contextvars.get_contextvars()


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)


configure()
logging.captureWarnings(True)
