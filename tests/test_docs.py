"""The OpenAPI schema and the docs page, served without any outside network."""

from __future__ import annotations

import re

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


def test_schema_lists_the_runner_protocol():
    response = Client().get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in (
        "/api/v1/runs",
        "/api/v1/runs/{id}/claim",
        "/api/v1/runs/{id}/events",
        "/api/v1/commands/{id}/ack",
        "/api/v1/runners",
        "/api/v1/runs/{id}/runner-jobs",
        "/api/v1/sessions",
        "/api/v1/sessions/{id}",
        "/api/v1/sessions/{id}/read",
        "/api/v1/sessions/{id}/trace",
        "/api/v1/sessions/{id}/output",
        "/api/v1/sessions/{id}/storage",
        "/api/v1/sessions/{id}/storage/evict",
    ):
        assert path in paths, path


@override_settings(WHITENOISE_USE_FINDERS=True)
def test_docs_page_loads_its_assets_from_this_server():
    client = Client()
    response = client.get("/api/v1/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert assets and "cdn" not in page.lower()
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_the_schema_has_every_route_and_every_operation_documents_its_errors():
    """Every /api/v1 route of the URL conf is in the schema, and each keyed operation documents
    401, 403, 400 and 503 in the envelope, 404 where it has an id, and 413 where it takes a body."""
    from django.urls import get_resolver
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    documented = set(schema["paths"])
    api = next(p for p in get_resolver().url_patterns if str(p.pattern) == "api/v1/")
    for pattern in api.url_patterns:
        route = str(pattern.pattern)
        if route in ("schema/", "docs/"):
            continue
        # The router's regexes: ^runs/(?P<pk>[^/.]+)/claim/?$ -> /api/v1/runs/{id}/claim
        import re

        path = "/api/v1/" + re.sub(r"\(\?P<pk>[^)]*\)", "{id}", route).strip("^$").removesuffix("/?")
        assert path in documented, path
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if not operation.get("security"):
                continue
            expected = {"400", "401", "403", "503"}
            if "{id}" in path:
                expected.add("404")
            if method in ("post", "put"):
                expected.add("413")
            assert expected <= set(operation["responses"]), (method, path)
            for status in expected:
                body = operation["responses"][status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/Error"}, (method, path, status)
