"""agentrun's middleware, in the order settings.MIDDLEWARE runs it: Django's own error pages under
/api/ in the error envelope; 503 without a database; bodies over the limit refused (413) before
anything parses them; unstorable text in a path or query refused (400); API routing on the path
as the client encoded it; and Django's session, CSRF, auth, messages and framing middleware
skipped for the API, which uses none of them."""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.deprecation import MiddlewareMixin

from agentrun import logs
from agentrun.errors import SCHEMA_INVALID, AgentRunError, infra_failed, invalid, json_error
from agentrun.text import UNSTORABLE, UNSTORABLE_MESSAGE

# The environ key under which a request's log fields go back to the server, for its access line.
LOG_FIELDS_KEY = "agentrun.log_fields"
REQUEST_ID_HEADER = "X-Request-ID"
# A client's request id is kept when it looks like one (a UUID, a trace id); anything else is
# replaced, never echoed.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The path parameter a route's name says it is: the field it goes in on the request's log lines.
_ID_FIELDS = (
    ("session-events-", "session_id"),
    ("session-", "session_id"),
    ("queue-task-", "task_id"),
    ("command-", "command_id"),
    ("run-", "run_id"),
)


class RequestContextMiddleware:
    """Every log line of a request carries its `request_id` (the client's `X-Request-ID` when it
    is sane, else minted; echoed in the response), and, once known, its tenant (agentrun.auth)
    and the run, session, command or task its path names. The fields are bound in this thread's
    context for the request and handed back to the server for its access line."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        logs.clear()
        logs.bind(request_id=request_id)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        request.META[LOG_FIELDS_KEY] = logs.bound()
        return response

    def process_view(self, request, view_func, view_args, view_kwargs):
        match = request.resolver_match
        name = (match.url_name or "") if match is not None else ""
        object_id = view_kwargs.get("pk")
        if object_id and isinstance(object_id, str):
            for prefix, field in _ID_FIELDS:
                if name.startswith(prefix):
                    logs.bind(**{field: object_id[:200]})
                    break
        return None


# Health endpoints say why the service is down; they must answer even without a database.
_ALWAYS_SERVED = frozenset({"/api/v1/health", "/livez", "/readyz"})


class DatabaseRequiredMiddleware:
    """Production without DATABASE_URL serves nothing but 503 infra-failed (SPEC §2, §7)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if getattr(settings, "AGENTRUN_DATABASE_MISSING", False) and request.path.rstrip("/") not in _ALWAYS_SERVED:
            message, details = missing_database_error()
            return json_error(infra_failed(message, **details))
        return self.get_response(request)


def missing_database_error() -> tuple[str, dict]:
    return (
        "DATABASE_URL is required for the live runtime; the embedded database is only for development and tests",
        {"adapter": "postgres", "databaseUrl": "missing", "memoryFallback": "disabled"},
    )


class BodySizeLimitMiddleware:
    """Refuse a body over the limit with 413 before anything parses it, in a way every client
    can read: the body is read and thrown away first (up to `DRAIN_LIMIT`), since a server that
    answers and closes while the client is still sending resets the connection, and clients
    such as httpx then report a dropped connection instead of the answer. A chunked body, which
    has no length to check, is read up to the limit here and handed on with its length."""

    DRAIN_LIMIT = 64 * 1024 * 1024
    DRAIN_SECONDS = 15.0
    CHUNK = 256 * 1024

    def __init__(self, get_response):
        self.get_response = get_response
        self.limit = settings.AGENTRUN_MAX_BODY_BYTES

    def __call__(self, request):
        raw_length = request.META.get("CONTENT_LENGTH") or ""
        if not raw_length and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            return self._chunked(request)
        try:
            length = int(raw_length or 0)
        except ValueError:
            return json_error(AgentRunError(SCHEMA_INVALID, "Content-Length is not a number", status=400))
        if length > self.limit:
            self._drain(request, length)
            return self._too_large(f"request body is {length} bytes")
        return self.get_response(request)

    def _too_large(self, what: str) -> HttpResponse:
        response = json_error(
            AgentRunError(
                SCHEMA_INVALID, f"{what}; the limit is {self.limit}", status=413, details={"limitBytes": self.limit}
            )
        )
        response["Connection"] = "close"
        return response

    def _drain(self, request: HttpRequest, length: int) -> None:
        stream = request.META.get("wsgi.input")
        if stream is None or length > self.DRAIN_LIMIT:
            return
        deadline = time.monotonic() + self.DRAIN_SECONDS
        left = length
        try:
            while left > 0 and time.monotonic() < deadline:
                data = stream.read(min(self.CHUNK, left))
                if not data:
                    return
                left -= len(data)
        except OSError:  # the client went away: nobody is left to answer
            return

    def _chunked(self, request):
        stream = request.META["wsgi.input"]
        chunks, size = [], 0
        while size <= self.limit:
            data = stream.read(self.CHUNK)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        if size > self.limit:
            self._drain(request, self.DRAIN_LIMIT)
            return self._too_large("the chunked request body is larger than that")
        body = b"".join(chunks)
        request.META["wsgi.input"] = io.BytesIO(body)
        request.META["CONTENT_LENGTH"] = str(len(body))
        request._stream = LimitedStream(request.META["wsgi.input"], len(body))
        return self.get_response(request)


class UnstorableInputMiddleware:
    """A path or query parameter is an identifier or a number: one holding U+0000 or an unpaired
    surrogate is a 400 naming it (API.md), never a database error."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if UNSTORABLE.search(request.path_info):
            return json_error(invalid(f"the path {UNSTORABLE_MESSAGE}", field="path"))
        for name, values in request.GET.lists():
            if UNSTORABLE.search(name):
                return json_error(invalid(f"a query parameter name {UNSTORABLE_MESSAGE}", parameter=name))
            if any(UNSTORABLE.search(value) for value in values):
                return json_error(invalid(f"{name} {UNSTORABLE_MESSAGE}", parameter=name))
        return self.get_response(request)


class RawPathMiddleware:
    """API paths route on the path as the client encoded it, so that `%2F` inside a session id
    (`/sessions/owner%2Frepo%2342/read`) stays part of the id instead of splitting the path.

    WSGI hands Django the path already decoded; the server's raw URI (gunicorn's `RAW_URI`,
    others' `REQUEST_URI`) still has it. Each `%2F` becomes a NUL while the rest is decoded (a
    NUL can be in no id, and a `%00` in the raw path is refused first), and the view's arguments
    get their slashes back. Without a raw URI the decoded path is used as it is."""

    PREFIX = "/api/"
    SLASH = "\x00"

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        raw = request.META.get("RAW_URI") or request.META.get("REQUEST_URI")
        if raw and request.path_info.startswith(self.PREFIX):
            raw_path = raw.split("?", 1)[0].split("#", 1)[0]
            if "://" in raw_path:  # an absolute-form request target
                raw_path = "/" + raw_path.split("://", 1)[1].partition("/")[2]
            if _ENCODED_NUL.search(raw_path):
                return json_error(invalid(f"the path {UNSTORABLE_MESSAGE}", field="path"))
            try:
                # The server decoded the request line's bytes as latin-1: undo that first.
                pieces = [
                    unquote_to_bytes(piece.encode("latin-1")).decode("utf-8")
                    for piece in _ENCODED_SLASH.split(raw_path)
                ]
            except (UnicodeDecodeError, UnicodeEncodeError):
                return json_error(invalid("the path is not UTF-8 once percent-decoded", field="path"))
            path = self.SLASH.join(pieces)
            if path.startswith(self.PREFIX):
                request.path_info = path
                request.path = request.META.get("SCRIPT_NAME", "").rstrip("/") + path
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        for name, value in view_kwargs.items():
            if isinstance(value, str) and self.SLASH in value:
                view_kwargs[name] = value.replace(self.SLASH, "/")
        return None


_ENCODED_SLASH = re.compile("%2[fF]")
_ENCODED_NUL = re.compile("%00")


class ApiErrorEnvelopeMiddleware:
    """Under /api/, an error page Django renders itself (an unknown route, also with DEBUG on)
    leaves in the envelope like every other error."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            response.status_code >= 400
            and request.path.startswith("/api/")
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            kind = "internal" if response.status_code >= 500 else SCHEMA_INVALID
            message = (
                "internal error" if response.status_code >= 500 else f"no route for {request.method} {request.path}"
            )
            if response.status_code == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            return json_error(AgentRunError(kind, message, status=response.status_code))
        return response


API_PREFIX = "/api/"


class _SiteOnly(MiddlewareMixin):
    """A middleware that only the admin and browsable pages need (sessions, CSRF, logins,
    messages, framing), skipped for API requests: the API authenticates with bearer keys, keeps
    no session and sets no cookie, and every skipped layer is time saved on each runner call.
    Subclasses of Django's own, so Django's checks still find the middleware they look for."""

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path_info.startswith(API_PREFIX):
            return self.get_response(request)  # type: ignore[return-value]  # a sync chain: never a coroutine
        return super().__call__(request)  # type: ignore[return-value]  # a sync chain: never a coroutine


class SiteOnlySessionMiddleware(_SiteOnly, SessionMiddleware):
    pass


class SiteOnlyAuthenticationMiddleware(_SiteOnly, AuthenticationMiddleware):
    pass


class SiteOnlyMessageMiddleware(_SiteOnly, MessageMiddleware):
    pass


class SiteOnlyXFrameOptionsMiddleware(_SiteOnly, XFrameOptionsMiddleware):
    pass


class SiteOnlyCsrfViewMiddleware(_SiteOnly, CsrfViewMiddleware):
    def process_view(
        self, request: HttpRequest, callback: Callable[..., Any], callback_args: Any, callback_kwargs: Any
    ) -> HttpResponseForbidden | None:
        if request.path_info.startswith(API_PREFIX):
            return None
        return super().process_view(request, callback, callback_args, callback_kwargs)
