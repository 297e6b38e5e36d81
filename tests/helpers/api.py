"""API clients holding one key, and the error envelope every error answers with."""

from __future__ import annotations

import json
from typing import Any

from rest_framework.test import APIClient

from agentrun.auth import api_key_create
from tests.helpers.data import PROJECT, TENANT


class KeyClient:
    """An API client that sends one key, with JSON helpers that return (status, body)."""

    def __init__(self, raw_key: str | None, key: Any = None):
        self.client = APIClient()
        self.key = key
        if raw_key:
            self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")

    def _send(self, method, path, body=None, **kwargs):
        url = path if path.startswith("/") else f"/api/v1/{path}"
        # As gunicorn does: the path as sent, so a %2F inside an id stays in the id.
        kwargs.setdefault("RAW_URI", url)
        call = getattr(self.client, method)
        response = call(url, **kwargs) if body is None else call(url, body, format="json", **kwargs)
        if response.streaming and response["Content-Type"].startswith("text/event-stream"):
            # An SSE stream: its head says it started; a live one would go on for ever.
            head = next(iter(response.streaming_content))
            # Ended as if read to its end: the test client's wrapper (the response's iterator)
            # closes the response the way it keeps the test's database connection open.
            response._iterator.close()
            return response.status_code, {"stream": head.decode()}
        # A long-poll that had to wait streams its one JSON body.
        content = b"".join(response.streaming_content) if response.streaming else response.content
        data = json.loads(content) if content and response["Content-Type"].startswith("application/json") else None
        return response.status_code, data

    def get(self, path, **params):
        return self._send("get", path, data=params or None)

    def post(self, path, body=None):
        return self._send("post", path, body if body is not None else {})

    def put(self, path, body=None):
        return self._send("put", path, body if body is not None else {})

    def raw(self, method, path, data: bytes, content_type="application/json"):
        url = path if path.startswith("/") else f"/api/v1/{path}"
        response = getattr(self.client, method)(url, data=data, content_type=content_type, RAW_URI=url)
        return response.status_code, response.json() if response.content else None


def make_key(role: str, *, tenant: str = TENANT, project: str | None = PROJECT, run: str | None = None) -> KeyClient:
    key, raw = api_key_create(tenant_id=tenant, project_id=project, role=role, run_id=run)
    return KeyClient(raw, key)


def raw_key(role: str, *, tenant: str = TENANT, project: str | None = PROJECT, run: str | None = None) -> str:
    """A new key's secret, for clients of our own (httpx, the runner's SDK)."""
    return api_key_create(tenant_id=tenant, project_id=project, role=role, run_id=run)[1]


def assert_error(status, body, code, kind):
    """The one error envelope: {"error": {"kind", "message", "details"}} with this status and kind."""
    assert status == code, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"kind", "message", "details"}, body
    assert body["error"]["kind"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
