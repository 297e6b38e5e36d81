"""What the OpenAPI schema says that drf-spectacular cannot guess: the error envelope and the
statuses every route answers with it, the bearer key scheme, the limits of path and query
parameters, the probes outside /api/v1, and canonical paths.

Views declare their records and the errors particular to them (`error(...)`); the postprocessing
hook `document_errors` adds the statuses every route of a kind answers (`error_statuses`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, TypeVar

from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers

from agentrun.backends import PROFILES
from agentrun.errors import INTERNAL
from agentrun.fields import IDENTIFIER_MAX_LENGTH, SESSION_ID_MAX_LENGTH, IdentifierField
from agentrun.vocabulary import FAILURE_KINDS
from agentrun.wire import MAX_WAIT_SECONDS, QueryIdentifier, QueryInteger, QueryText, QueryWait

FieldT = TypeVar("FieldT", bound=serializers.Field)

API_PREFIX = "/api/v1"
# Every kind an error can carry: the seed's failure kinds (a terminal run's 409 carries its
# failureKind) and `internal` for a 500.
ERROR_KINDS = sorted(FAILURE_KINDS | {INTERNAL})
ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "description": "The one error envelope: every status from 400 up answers with it.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "kind": {"type": "string", "enum": ERROR_KINDS},
                "message": {"type": "string", "description": "For people; prints no secret."},
                "details": {
                    "type": "object",
                    "additionalProperties": True,
                    "description": "What failed, e.g. `field` or `parameter`, `limitBytes`, `retryable`.",
                },
            },
            "required": ["kind", "message", "details"],
            "additionalProperties": False,
        }
    },
    "required": ["error"],
    "additionalProperties": False,
}
# The longest page token a listing hands out: its filters and position, with ids of up to 255
# characters that JSON may escape, in base64.
PAGE_TOKEN_MAX_LENGTH = 8192
# A seq or version as a decimal string (BIGINT_MAX has 19 digits).
CURSOR_MAX_LENGTH = 20
# A record's `readerId` (a computed field: its schema is given whole, as drf-spectacular reads no
# limits off a field given to `extend_schema_field`).
READER_ID_SCHEMA = {"type": "string", "nullable": True, "maxLength": IDENTIFIER_MAX_LENGTH}


class ReaderAttention:
    """The attention methods a session or a queue task has for the context's reader
    (`reader_id`): `readerId`, `attentionState` and `unread`. The serializer declares the fields
    (their order is the wire's), and `get_active`; the record carries `version` and, read with
    a reader, its cursor's `cursor_version`."""

    context: dict

    def get_active(self, record: Any) -> bool:
        raise NotImplementedError

    def _cursor_version(self, record: Any) -> int | None:
        """The reader's cursor's version, None without a reader or a cursor."""
        version = getattr(record, "cursor_version", None)
        return version if version is not None and self.context.get("reader_id") is not None else None

    def _read_cursor(
        self, record: Any, cursor: serializers.Serializer, *, record_id: tuple[str, str], version_source: str
    ) -> dict | None:
        """The reader's cursor on `record` rendered by `cursor` (one instance renders every row),
        None without one; `record_id` is the cursor's (source, value) of the record's id, and
        `version_source` the source of its version."""
        version = self._cursor_version(record)
        if version is None:
            return None
        return cursor.to_representation(
            {
                record_id[0]: record_id[1],
                "reader_id": self.context["reader_id"],
                version_source: version,
                "read_at": getattr(record, "cursor_read_at", None),
            }
        )

    @extend_schema_field(READER_ID_SCHEMA)
    def get_readerId(self, record: Any) -> str | None:
        return self.context.get("reader_id")

    def _changed_since_read(self, record: Any) -> bool:
        """Changed since the reader's cursor (every record without one)."""
        version = self._cursor_version(record)
        return version is None or version < record.version

    @extend_schema_field(serializers.ChoiceField(choices=["active", "unread", "read"]))
    def get_attentionState(self, record: Any) -> str:
        if self.get_active(record):
            return "active"
        return "unread" if self._changed_since_read(record) else "read"

    @extend_schema_field(serializers.BooleanField())
    def get_unread(self, record: Any) -> bool:
        """Not active and changed since the reader's cursor (every inactive record without one)."""
        return not self.get_active(record) and self._changed_since_read(record)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "agentrun.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "agentrun API key",
            "description": "An agentrun API key: `Authorization: Bearer ar_…`. Its role (client, runner, "
            "operator) decides what it may call, its tenant and project what it sees.",
        }


class ErrorSerializer(serializers.Serializer):
    """The error envelope, for the schema only (`ERROR_SCHEMA`)."""


class ErrorSchema(OpenApiSerializerExtension):
    target_class = ErrorSerializer

    def get_name(self, auto_schema, direction):
        return "Error"

    def map_serializer(self, auto_schema, direction):
        return copy.deepcopy(ERROR_SCHEMA)


class PageListSchema(AutoSchema):
    """For a ViewSet whose `list` answers one page object (`{items, count, cursor, ...}`): not a
    bare array of its items, as drf-spectacular assumes for a `list` action."""

    def _is_list_view(self, serializer: object = None) -> bool:
        return False


def error(description: str) -> OpenApiResponse:
    """An error a view answers, in the envelope; `document_errors` adds what every route says."""
    return OpenApiResponse(ErrorSerializer, description=description)


class JSONObjectSchema(OpenApiSerializerFieldExtension):
    target_class = "agentrun.fields.JSONObjectField"

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "object", "additionalProperties": True}


def documented_enum(field_class: type[FieldT], choices: Iterable[str], *, keep_order: bool = False) -> type[FieldT]:
    """`field_class`, for a value the service checks against `choices` (so its 400 stays the
    service's): the schema lists them (sorted, unless `keep_order`)."""
    subclass = type(field_class.__name__, (field_class,), {"__module__": __name__})
    enum = list(choices) if keep_order else sorted(choices)
    return extend_schema_field({"type": "string", "enum": enum})(subclass)


# An IdentifierField naming a backend profile (checked by `require_profile`).
BackendProfileField = documented_enum(IdentifierField, PROFILES)
# A query parameter naming one.
BackendProfileParameter = documented_enum(QueryText, PROFILES, keep_order=True)


# --- parameters ---------------------------------------------------------------------------


class QueryParameterSchema(OpenApiSerializerFieldExtension):
    """A query serializer's field (`agentrun.wire`), exploded into a parameter by
    `extend_schema(parameters=[...Query])`: its type and the limits the server enforces."""

    target_class = "agentrun.wire.QueryParameter"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        field = self.target
        if isinstance(field, QueryInteger):
            schema: dict = {"type": "integer", "minimum": field.minimum}
            if field.at_most is not None:
                schema["maximum"] = field.at_most
            if field.documents_default and field.absent is not None:
                schema["default"] = field.absent
            return schema
        if isinstance(field, QueryWait):
            return {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS, "default": 0}
        if isinstance(field, QueryIdentifier):
            return {"type": "string", "maxLength": field.max_length}
        raise TypeError(f"{type(field).__name__} needs its schema here (or documented_enum)")


# --- statuses -----------------------------------------------------------------------------

_BAD_REQUEST = (
    "`schema-invalid`: a body field, path or query parameter is invalid, over its length or "
    "holds text that cannot be stored (`details` names it)."
)
_UNAUTHENTICATED = "`auth-required`: no API key, or not a valid one."
_FORBIDDEN = (
    "`forbidden`: this key's role may not call this route; `tenant-policy-denied`: the body names "
    "another tenant or project, or an object of another tenant."
)
_NOT_FOUND = (
    "`schema-invalid`: no such object in this key's tenant and project (an object of another tenant "
    "is not found either)."
)
_NOT_ACCEPTABLE = "`schema-invalid`: the Accept header allows no `application/json`."
_CONFLICT = (
    "`schema-invalid` with `details.retryable`: a concurrent write conflicted with this one every time "
    "it was retried; send it again."
)
_TOO_LARGE = "`schema-invalid`: the body is over 1 MiB (`details.limitBytes`)."
_UNSUPPORTED = "`schema-invalid`: the body is not `application/json`."
_TOO_MANY_FAILURES = (
    "`auth-required`: too many failed API key lookups from this address; `Retry-After` (and "
    "`details.retryAfterSeconds`) says when it may try again."
)
_UNAVAILABLE = "`infra-failed`: the database is unavailable or not configured."


def error_statuses(*, path: str, method: str, authenticated: bool) -> dict[str, str]:
    """The envelope statuses a route answers, whatever it does: bad input (400), auth (401, 403,
    and 429 for an address with too many failed key lookups), a missing object behind a path
    parameter (404), content negotiation (406), a body's type and size and write conflicts (409,
    413, 415), and a lost database (503)."""
    statuses = {"400": _BAD_REQUEST}
    if authenticated:
        statuses.update({"401": _UNAUTHENTICATED, "403": _FORBIDDEN, "429": _TOO_MANY_FAILURES})
    if "{" in path:
        statuses["404"] = _NOT_FOUND
    statuses["406"] = _NOT_ACCEPTABLE
    if method in ("post", "put", "patch"):
        statuses.update({"409": _CONFLICT, "413": _TOO_LARGE, "415": _UNSUPPORTED})
    statuses["503"] = _UNAVAILABLE
    return statuses


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def _path_id_schema(path: str) -> dict:
    if path.startswith(f"{API_PREFIX}/sessions/"):
        return {"type": "string", "minLength": 1, "maxLength": SESSION_ID_MAX_LENGTH}
    return {"type": "string", "minLength": 1, "maxLength": IDENTIFIER_MAX_LENGTH}


_PATH_ID_DESCRIPTIONS = {
    "runs": "A run id.",
    "commands": "A command id.",
    "queue-tasks": "A queue task id.",
    "sessions": "A session id, percent-encoded as encodeURIComponent does: `%2F` is part of the id "
    "(`owner%2Frepo%2342` is `owner/repo#42`).",
}


def _document_path_ids(path: str, operation: dict) -> None:
    resource = path.removeprefix(f"{API_PREFIX}/").split("/", 1)[0]
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "path" and parameter.get("name") == "id":
            parameter["schema"] = _path_id_schema(path)
            parameter["description"] = _PATH_ID_DESCRIPTIONS.get(resource, "An id.")


def _probe(description: str, answers: dict) -> dict:
    """A Kubernetes probe outside /api/v1: no key, plain JSON."""
    responses = {
        status: {"description": text, "content": {"application/json": {"schema": schema}}}
        for status, (text, schema) in answers.items()
    }
    responses["400"] = _error_response(_BAD_REQUEST)
    return {
        "get": {
            "operationId": description.split(":")[0],
            "description": description,
            "tags": ["probes"],
            "security": [],
            "responses": responses,
        }
    }


_LIVEZ = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ok"]}},
    "required": ["status"],
    "additionalProperties": False,
}
_READYZ = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not-ready"]},
        "message": {"type": "string", "nullable": True, "maxLength": 200},
    },
    "required": ["status", "message"],
    "additionalProperties": False,
}
PROBES = {
    "/livez": _probe("livez: the process answers; it touches no database.", {"200": ("Alive.", _LIVEZ)}),
    "/readyz": _probe(
        "readyz: the database is reachable and migrated.",
        {"200": ("Ready.", _READYZ), "503": ("Not ready; `message` says why.", _READYZ)},
    ),
}


METRICS = {
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "description": (
                "Prometheus metrics in the text exposition format. With AGENTRUN_METRICS_TOKEN set, "
                "send it as `Authorization: Bearer <token>`; unset, /metrics is open."
            ),
            "tags": ["probes"],
            "security": [],
            "responses": {
                "200": {
                    "description": "Every metric (README: Metrics).",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "400": _error_response(_BAD_REQUEST),
                "401": _error_response(
                    "`auth-required`: AGENTRUN_METRICS_TOKEN is set and the request did not send it."
                ),
                "503": _error_response(_UNAVAILABLE),
            },
        }
    }
}


def _describe_success(responses: dict) -> None:
    if "201" in responses:
        responses["201"]["description"] = responses["201"].get("description") or "Created."
        if "200" in responses:
            responses["200"]["description"] = responses["200"].get("description") or (
                "An idempotent replay (the same key and body) or an update of a known record: nothing new was created."
            )
    elif "200" in responses:
        responses["200"]["description"] = responses["200"].get("description") or "OK."


def document_errors(result, generator, request, public):
    """POSTPROCESSING_HOOKS: the Error component, every route's envelope statuses, path id limits
    and the probes."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = copy.deepcopy(ERROR_SCHEMA)
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            _document_path_ids(path, operation)
            responses = operation.setdefault("responses", {})
            statuses = error_statuses(path=path, method=method, authenticated=bool(operation.get("security")))
            for status, description in statuses.items():
                response = responses.get(status)
                if response is None:
                    responses[status] = _error_response(description)
                # The view's own words first, then what every such route answers.
                elif (
                    response.get("content", {}).get("application/json", {}).get("schema") == ERROR_REF
                    and description not in response["description"]
                ):
                    response["description"] = f"{response['description']} {description}".strip()
            _describe_success(responses)
            operation["responses"] = dict(sorted(responses.items()))
    result["paths"].update(PROBES)
    result["paths"].update(METRICS)
    return result


def canonical_paths(endpoints, **kwargs):
    """Routes answer with or without a trailing slash; document them without it, as clients call them."""
    return [(path.rstrip("/") if path != "/" else path, regex, method, view) for path, regex, method, view in endpoints]
