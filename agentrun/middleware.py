"""Middleware that answers before a view runs."""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

from agentrun.errors import SCHEMA_INVALID, AgentRunError, infra_failed, json_error

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
        "DATABASE_URL is required for the live runtime; the embedded database is only for "
        "development and tests",
        {"adapter": "postgres", "databaseUrl": "missing", "memoryFallback": "disabled"},
    )


class BodySizeLimitMiddleware:
    """Refuse a body over the limit with 413 before anything reads it."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.limit = settings.AGENTRUN_MAX_BODY_BYTES

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return json_error(AgentRunError(SCHEMA_INVALID, "Content-Length is not a number", status=400))
        if length > self.limit:
            return json_error(
                AgentRunError(
                    SCHEMA_INVALID,
                    f"request body is {length} bytes; the limit is {self.limit}",
                    status=413,
                    details={"limitBytes": self.limit},
                )
            )
        return self.get_response(request)


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
            message = "internal error" if response.status_code >= 500 else f"no route for {request.method} {request.path}"
            if response.status_code == 405:
                message = f"method {request.method} is not allowed on {request.path}"
            return json_error(AgentRunError(kind, message, status=response.status_code))
        return response


def _site_only(path: str):
    """A middleware that only the admin and browsable pages need (sessions, CSRF, logins,
    messages, framing), skipped for API requests: the API authenticates with bearer keys, keeps
    no session and sets no cookie, and every skipped layer is time saved on each runner call.
    A subclass, so Django's checks still find the middleware they look for."""
    middleware_class = import_string(path)

    class SiteOnly(middleware_class):
        def __call__(self, request):
            if request.path_info.startswith(API_PREFIX):
                return self.get_response(request)
            return super().__call__(request)

        if hasattr(middleware_class, "process_view"):

            def process_view(self, request, view, args, kwargs):
                if request.path_info.startswith(API_PREFIX):
                    return None
                return super().process_view(request, view, args, kwargs)

    SiteOnly.__name__ = SiteOnly.__qualname__ = f"SiteOnly{middleware_class.__name__}"
    return SiteOnly


API_PREFIX = "/api/"
SiteOnlySessionMiddleware = _site_only("django.contrib.sessions.middleware.SessionMiddleware")
SiteOnlyCsrfViewMiddleware = _site_only("django.middleware.csrf.CsrfViewMiddleware")
SiteOnlyAuthenticationMiddleware = _site_only("django.contrib.auth.middleware.AuthenticationMiddleware")
SiteOnlyMessageMiddleware = _site_only("django.contrib.messages.middleware.MessageMiddleware")
SiteOnlyXFrameOptionsMiddleware = _site_only("django.middleware.clickjacking.XFrameOptionsMiddleware")
