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
    for path in ("/api/v1/runs", "/api/v1/runs/{id}/claim", "/api/v1/runs/{id}/events",
                 "/api/v1/commands/{id}/ack", "/api/v1/runners", "/api/v1/runs/{id}/runner-jobs",
                 "/api/v1/sessions", "/api/v1/sessions/{id}", "/api/v1/sessions/{id}/read",
                 "/api/v1/sessions/{id}/trace", "/api/v1/sessions/{id}/output", "/api/v1/sessions/{id}/storage",
                 "/api/v1/sessions/{id}/storage/evict"):
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
