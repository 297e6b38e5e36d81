"""What /api/v1/schema/ says, checked against the URL conf and against the server: every route is
documented with every method it answers, every operation lists the envelope statuses it can
answer, every string has its limit, and the limits on query parameters are the server's.

tests/test_schemathesis.py then checks the answers themselves against the schema.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from agentrun.errors import INTERNAL
from agentrun.fields import BIGINT_MAX
from agentrun.openapi import PAGE_TOKEN_MAX_LENGTH
from agentrun.vocabulary import FAILURE_KINDS
from queues import services as queue_services
from tests.helpers import PROJECT, TENANT, assert_error, make_key, make_run

pytestmark = pytest.mark.django_db

# The schema documents itself and its docs page nowhere; the admin is the site, not the API.
UNDOCUMENTED = {"/api/v1/schema/", "/api/v1/docs/"}
# No API key: /metrics has its own token (AGENTRUN_METRICS_TOKEN), when one is set.
PUBLIC = {"/api/v1/health", "/livez", "/readyz", "/metrics"}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
LIST_OPERATIONS = {
    ("get", "/api/v1/runs/{id}/events"): {"items", "count", "cursor"},
    ("get", "/api/v1/runs/{id}/commands"): {"items", "count", "cursor"},
    ("get", "/api/v1/runs/{id}/runner-jobs"): {"items", "count", "cursor"},
    ("get", "/api/v1/sessions"): {"items", "count", "cursor", "nextPageToken", "filters"},
    ("get", "/api/v1/sessions/{id}/trace"): {"sessionId", "runId", "items", "count", "cursor"},
    ("get", "/api/v1/sessions/{id}/output"): {"sessionId", "runId", "items", "count", "cursor"},
    ("get", "/api/v1/queue-tasks"): {"items", "count", "cursor", "nextPageToken"},
    ("get", "/api/v1/backends"): {"items", "count"},
}


@pytest.fixture(scope="module")
def schema():
    response = Client().get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    return json.loads(response.content)


def operations(schema):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def resolve_ref(schema, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


# --- the URL conf ------------------------------------------------------------------------------


def _patterns(patterns, prefix="/"):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _patterns(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            assert isinstance(pattern, URLPattern)
            yield prefix + str(pattern.pattern), pattern.callback


def _path(pattern: str) -> str:
    """`/api/v1/^runs/(?P<pk>[^/]+)/claim/?$` -> `/api/v1/runs/{id}/claim`."""
    head, _, route = pattern.partition("^")
    if route.endswith("/?$"):
        route = route[:-3]
    return head + route.replace("(?P<pk>[^/]+)", "{id}")


def _methods(callback) -> set[str]:
    actions = getattr(callback, "actions", None)  # a viewset route: method -> action
    if actions is None:
        view = getattr(callback, "view_class", None)
        if view is None:  # a plain function view: the probes answer GET (and HEAD)
            return {"get"}
        actions = {name: name for name in view.http_method_names if hasattr(view, name)}
    return {method for method in actions if method not in ("head", "options")}


def url_conf_operations() -> set[tuple[str, str]]:
    found = set()
    for pattern, callback in _patterns(get_resolver().url_patterns):
        path = _path(pattern)
        if path.startswith("/admin/") or path in UNDOCUMENTED:
            continue
        found.update((method, path) for method in _methods(callback))
    return found


def test_the_schema_lists_every_route_of_the_url_conf_and_no_other(schema):
    documented = {(method, path) for path, method, _ in operations(schema)}
    assert documented == url_conf_operations()


def test_a_method_a_path_does_not_list_is_405_in_the_envelope(schema):
    client = make_key("client")
    for path, methods in schema["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        method = next(m for m in ("delete", "patch", "put", "post") if m not in methods)
        status, body = client._send(method, path.replace("{id}", "x"), {})
        assert_error(status, body, 405, "schema-invalid")
    for probe in ("/livez", "/readyz"):
        response = Client().post(probe)
        assert response.status_code == 405 and "GET" in response["Allow"], probe


# --- statuses ----------------------------------------------------------------------------------


def expected_statuses(path: str, method: str) -> set[str]:
    """The envelope statuses every route of its kind answers (agentrun/openapi.py, error_statuses):
    bad input, content negotiation and a lost database everywhere; auth where a key is needed; 404
    behind a path id; a body's size and type, and write conflicts, where there is a body."""
    if path in ("/livez", "/readyz"):
        return {"400"}
    if path == "/metrics":  # text for Prometheus: no content negotiation; its own token
        return {"400", "401", "503"}
    statuses = {"400", "406", "503"}
    if path not in PUBLIC:
        statuses |= {"401", "403", "429"}
    if "{id}" in path:
        statuses.add("404")
    if method in ("post", "put"):
        statuses |= {"409", "413", "415"}
    return statuses


def test_every_operation_documents_its_envelope_statuses(schema):
    for path, method, operation in operations(schema):
        responses = operation["responses"]
        for status in expected_statuses(path, method):
            assert status in responses, (method, path, status)
            content = responses[status]["content"]["application/json"]["schema"]
            if (path, status) not in (("/api/v1/health", "503"), ("/readyz", "503")):
                assert content == ERROR_REF, (method, path, status)
            assert responses[status]["description"], (method, path, status)
        successes = {status for status in responses if status.startswith("2")}
        # 204: a finished run's stream resumed past its end (SSE clients stop reconnecting on it).
        assert successes in ({"200"}, {"200", "201"}, {"200", "204"}), (method, path, successes)
        assert set(responses) - successes - {"503"} <= expected_statuses(path, method), (method, path)


def test_the_routes_own_errors_are_described(schema):
    paths = schema["paths"]
    for path in (
        "/api/v1/runs/{id}/heartbeat",
        "/api/v1/runs/{id}/finish",
        "/api/v1/runs/{id}/events",
        "/api/v1/commands/{id}/ack",
        "/api/v1/commands/{id}/finish",
        "/api/v1/runs/{id}/claim",
    ):
        assert "runner-lease-conflict" in paths[path]["post"]["responses"]["409"]["description"], path
    for path in ("/api/v1/runs", "/api/v1/runs/{id}/commands", "/api/v1/queue-tasks", "/api/v1/runs/{id}/runner-jobs"):
        assert "idempotency key" in paths[path]["post"]["responses"]["409"]["description"], path
    assert "terminal" in paths["/api/v1/runs/{id}/commands"]["post"]["responses"]["409"]["description"]
    assert "256 KiB" in paths["/api/v1/runs/{id}/events"]["post"]["responses"]["413"]["description"]
    assert "1 MiB" in paths["/api/v1/runs/{id}/events"]["post"]["responses"]["413"]["description"]


def test_the_error_component_is_the_envelope_with_the_seeds_kinds(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["additionalProperties"] is False
    body = error["properties"]["error"]
    assert set(body["required"]) == {"kind", "message", "details"} and body["additionalProperties"] is False
    assert set(body["properties"]["kind"]["enum"]) == FAILURE_KINDS | {INTERNAL}
    assert body["properties"]["details"]["type"] == "object"


# --- shapes, auth, limits ----------------------------------------------------------------------


def test_lists_are_pages_not_bare_arrays(schema):
    for (method, path), keys in LIST_OPERATIONS.items():
        page = resolve_ref(
            schema, schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        )
        assert page.get("type") == "object", path
        assert set(page["properties"]) == keys and set(page["required"]) == keys, path
        assert resolve_ref(schema, page["properties"]["items"])["type"] == "array", path


def test_an_event_append_answers_an_event_or_a_page(schema):
    append = schema["paths"]["/api/v1/runs/{id}/events"]["post"]
    for status in ("200", "201"):
        answer = resolve_ref(schema, append["responses"][status]["content"]["application/json"]["schema"])
        assert answer["oneOf"] == [
            {"$ref": "#/components/schemas/EventOut"},
            {"$ref": "#/components/schemas/EventPageOut"},
        ]
    body = resolve_ref(schema, append["requestBody"]["content"]["application/json"]["schema"])
    assert len(body["oneOf"]) == 2


def test_every_route_but_the_probes_needs_a_bearer_key(schema):
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        **schema["components"]["securitySchemes"]["apiKey"],
        "type": "http",
        "scheme": "bearer",
    }
    for path, method, operation in operations(schema):
        if path in PUBLIC:
            assert not operation.get("security"), path
        else:
            assert operation["security"] == [{"apiKey": []}], (method, path)


def _strings(node, where: str):
    """Every string schema under `node` that is not a reference, with where it is."""
    if isinstance(node, dict):
        if node.get("type") == "string":
            yield where, node
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{where}[{index}]")


def test_every_string_has_a_limit(schema):
    """A string is an enum, a timestamp, or has a maxLength; only the error message (for people)
    has none."""
    nodes = [(f"components.{name}", component) for name, component in schema["components"]["schemas"].items()]
    nodes += [(f"{method} {path}", operation.get("parameters", [])) for path, method, operation in operations(schema)]
    for base, node in nodes:
        for where, string in _strings(node, base):
            if where == "components.Error.properties.error.properties.message":
                continue
            assert "enum" in string or string.get("format") == "date-time" or "maxLength" in string, where


def test_identifiers_are_200_and_session_ids_255(schema):
    paths = schema["paths"]
    for path, method, operation in operations(schema):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                expected = 255 if path.startswith("/api/v1/sessions/") else 200
                assert parameter["schema"]["maxLength"] == expected, (method, path)
    run = resolve_ref(schema, paths["/api/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert run["properties"]["tenantId"]["maxLength"] == 200
    put = paths["/api/v1/sessions/{id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert resolve_ref(schema, put)["properties"]["sessionId"]["maxLength"] == 255


def query_parameters(schema, path: str, method: str = "get") -> dict[str, dict]:
    return {p["name"]: p["schema"] for p in schema["paths"][path][method].get("parameters", []) if p["in"] == "query"}


def test_query_parameters_have_their_types_and_bounds(schema):
    events = query_parameters(schema, "/api/v1/runs/{id}/events")
    assert events["afterSeq"] == {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX}
    assert events["limit"]["type"] == "integer" and events["limit"]["minimum"] == 1
    assert events["wait"]["type"] == "number" and (events["wait"]["minimum"], events["wait"]["maximum"]) == (0, 30)
    sessions = query_parameters(schema, "/api/v1/sessions")
    assert sessions["readerId"] == {"type": "string", "maxLength": 200}
    assert sessions["pageToken"] == {"type": "string", "maxLength": PAGE_TOKEN_MAX_LENGTH}
    assert "enum" in sessions["state"] and "enum" in sessions["backendProfile"]
    assert query_parameters(schema, "/api/v1/queues/stats")["queue"] == {"type": "string", "maxLength": 200}
    assert query_parameters(schema, "/api/v1/sessions/{id}/trace")["runId"] == {"type": "string", "maxLength": 200}


# --- the limits are the server's ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("sessions?readerId=" + "r" * 201, "readerId"),
        ("sessions/s1?readerId=" + "r" * 201, "readerId"),
        ("sessions?pageToken=" + "t" * (PAGE_TOKEN_MAX_LENGTH + 1), "pageToken"),
        ("sessions/s1/trace?runId=" + "r" * 201, "runId"),
        ("sessions/s1/output?runId=" + "r" * 201, "runId"),
        ("queue-tasks?queue=" + "q" * 201, "queue"),
        ("queue-tasks?pageToken=" + "t" * (PAGE_TOKEN_MAX_LENGTH + 1), "pageToken"),
        ("queues/stats?queue=" + "q" * 201, "queue"),
        ("queues/commander?queue=" + "q" * 201, "queue"),
        ("queues/commander?readerId=" + "r" * 201, "readerId"),
        (f"sessions?cursor={BIGINT_MAX + 1}", "cursor"),
        (f"queue-tasks?updatedAfter={BIGINT_MAX + 1}", "updatedAfter"),
        ("sessions?limit=" + "0" * 40 + "5", "limit"),
    ],
)
def test_a_query_parameter_over_its_limit_is_400_naming_it(client_api, path, parameter):
    make_run(session_id="s1")
    status, body = client_api.get(path)
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["parameter"] == parameter


def test_runner_query_parameters_over_their_limit_are_400(runner_api):
    run = make_run()
    for path, parameter in (
        (f"runs/{run.id}/runner-jobs?commandId=" + "c" * 201, "commandId"),
        (f"runs/{run.id}/events?afterSeq={BIGINT_MAX + 1}", "afterSeq"),
    ):
        status, body = runner_api.get(path)
        assert_error(status, body, 400, "schema-invalid")
        assert body["error"]["details"]["parameter"] == parameter


def test_a_query_parameter_at_its_limit_is_taken(client_api, runner_api):
    run = make_run(session_id="s1")
    assert client_api.get("sessions?readerId=" + "r" * 200)[0] == 200
    assert client_api.get("queues/commander?queue=" + "q" * 200 + "&readerId=" + "r" * 200)[0] == 200
    assert runner_api.get(f"runs/{run.id}/events?afterSeq={BIGINT_MAX}")[1]["cursor"] == str(BIGINT_MAX)


def test_page_tokens_stay_within_their_documented_length(client_api):
    """The longest tokens: ids and filters of the most escaped characters JSON writes."""
    widest = "\U0001f600"
    for index in range(2):
        make_run(session_id=widest * 254 + str(index), backend="claude-code")
    status, page = client_api.get("sessions", readerId=widest * 200, backendProfile="claude-code", limit=1)
    assert status == 200 and page["nextPageToken"], page
    assert len(page["nextPageToken"]) <= PAGE_TOKEN_MAX_LENGTH, len(page["nextPageToken"])
    for index in range(2):
        queue_services.task_create(
            tenant_id=TENANT,
            project_id=PROJECT,
            queue=widest * 200,
            lane="default",
            title="t",
            priority=index,
            backend_profile="echo",
        )
    status, page = client_api.get("queue-tasks", queue=widest * 200, limit=1)
    assert status == 200 and page["nextPageToken"], page
    assert len(page["nextPageToken"]) <= PAGE_TOKEN_MAX_LENGTH, len(page["nextPageToken"])
