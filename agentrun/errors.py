"""The one domain error, and the handler that renders every error in the envelope.

`{"error": {"kind": ..., "message": ..., "details": {...}}}` with the seed's kinds and statuses.
"""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError, DataError, InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

logger = logging.getLogger(__name__)

SCHEMA_INVALID = "schema-invalid"
TENANT_POLICY_DENIED = "tenant-policy-denied"
RUNNER_LEASE_CONFLICT = "runner-lease-conflict"
INFRA_FAILED = "infra-failed"
CANCELLED = "cancelled"
AUTH_REQUIRED = "auth-required"
FORBIDDEN = "forbidden"
INTERNAL = "internal"


class AgentRunError(Exception):
    """A failure with a seed `kind`, a message that prints no secret, an HTTP status and details."""

    def __init__(self, kind: str, message: str, *, status: int = 400, details: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.details = details or {}

    def envelope(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message, "details": self.details}}


def not_found(entity: str, object_id: str) -> AgentRunError:
    return AgentRunError(SCHEMA_INVALID, f"{entity} {object_id} was not found", status=404)


def invalid(message: str, **details: object) -> AgentRunError:
    return AgentRunError(SCHEMA_INVALID, message, status=400, details=details)


def conflict(kind: str, message: str, **details: object) -> AgentRunError:
    return AgentRunError(kind, message, status=409, details=details)


def infra_failed(message: str, **details: object) -> AgentRunError:
    return AgentRunError(INFRA_FAILED, message, status=503, details=details)


def _is_database_outage(exc: BaseException) -> bool:
    """The database is down, unreachable, shutting down or out of resources: not a conflict."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        from agentrun.transactions import sqlstate

        state = sqlstate(exc)
        return state is None or state[:2] in ("08", "53", "57", "58", "XX")
    try:
        from psycopg_pool import PoolTimeout
    except ImportError:  # pragma: no cover - the pool is a pinned dependency
        return False
    return isinstance(exc, PoolTimeout)


def to_agentrun_error(exc: BaseException) -> AgentRunError | None:
    """Map any exception we know to the envelope's terms; None for a bug."""
    if isinstance(exc, AgentRunError):
        return exc
    if isinstance(exc, RequestDataTooBig):
        return AgentRunError(SCHEMA_INVALID, "request body is larger than 1 MiB", status=413)
    if isinstance(exc, drf.ValidationError):
        return AgentRunError(SCHEMA_INVALID, "request is invalid", status=400, details={"fields": exc.detail})
    if isinstance(exc, drf.ParseError):
        return AgentRunError(SCHEMA_INVALID, f"malformed request body: {exc.detail}", status=400)
    if isinstance(exc, drf.UnsupportedMediaType):
        return AgentRunError(SCHEMA_INVALID, str(exc.detail), status=415)
    if isinstance(exc, (drf.NotAuthenticated, drf.AuthenticationFailed)):
        return AgentRunError(AUTH_REQUIRED, str(exc.detail), status=401)
    if isinstance(exc, (drf.PermissionDenied, DjangoPermissionDenied)):
        detail = getattr(exc, "detail", None) or "this key may not do that"
        return AgentRunError(FORBIDDEN, str(detail), status=403)
    if isinstance(exc, (drf.NotFound, Http404)):
        return AgentRunError(SCHEMA_INVALID, "not found", status=404)
    if isinstance(exc, drf.MethodNotAllowed):
        return AgentRunError(SCHEMA_INVALID, str(exc.detail), status=405)
    if isinstance(exc, drf.NotAcceptable):
        return AgentRunError(SCHEMA_INVALID, str(exc.detail), status=406)
    if isinstance(exc, drf.Throttled):
        return AgentRunError(SCHEMA_INVALID, str(exc.detail), status=429)
    if isinstance(exc, drf.APIException):
        return AgentRunError(SCHEMA_INVALID, str(exc.detail), status=exc.status_code)
    if isinstance(exc, SuspiciousOperation):
        return AgentRunError(SCHEMA_INVALID, "bad request", status=400)
    if _is_database_outage(exc):
        return AgentRunError(INFRA_FAILED, "the database is unavailable", status=503)
    if isinstance(exc, DatabaseError):
        return _database_refusal(exc)
    return None


def _database_refusal(exc: DatabaseError) -> AgentRunError | None:
    """What the database refused of a request that got past validation: a race lost every time
    it was retried is a 409 to retry; a value out of a column's range is the client's 400."""
    from agentrun.transactions import ABORTED, sqlstate

    state = sqlstate(exc) or ""
    if state in ABORTED:
        return AgentRunError(
            SCHEMA_INVALID,
            "a concurrent write conflicted with this one every time it was retried; retry it",
            status=409,
            details={"retryable": True},
        )
    if isinstance(exc, DataError) or state.startswith("22"):
        logger.warning("the database refused a value: %s", exc)
        return AgentRunError(SCHEMA_INVALID, "a value is out of range for what it is stored in", status=400)
    return None


def internal_error() -> AgentRunError:
    return AgentRunError(INTERNAL, "internal error", status=500)


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error leaves in the envelope."""
    error = to_agentrun_error(exc)
    if error is None:
        logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
        error = internal_error()
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="agentrun"'
    if error.status == 429 and "retryAfterSeconds" in error.details:
        headers["Retry-After"] = str(error.details["retryAfterSeconds"])
    return Response(error.envelope(), status=error.status, headers=headers)


def json_error(error: AgentRunError) -> JsonResponse:
    return JsonResponse(error.envelope(), status=error.status)


def handler404(request, exception=None):
    return json_error(AgentRunError(SCHEMA_INVALID, f"no route for {request.path}", status=404))


def handler500(request):
    return json_error(internal_error())


def handler400(request, exception=None):
    return json_error(AgentRunError(SCHEMA_INVALID, "bad request", status=400))


def handler403(request, exception=None):
    return json_error(AgentRunError(FORBIDDEN, "forbidden", status=403))
