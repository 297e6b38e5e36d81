"""Factories and clients shared by the tests. Data is built by small helpers, not fixture files."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from agentrun.auth import api_key_create
from runs import services
from tests.kube_fake import fake_cluster, fake_kube  # noqa: F401 - Kubernetes API fakes, fixtures for every test

TENANT = "acme"


@pytest.fixture(scope="session", autouse=True)
def _stop_listener_before_teardown(django_db_setup):
    """The notification listener holds a connection to the test database: close it before
    pytest-django drops that database."""
    yield
    from agentrun import notify

    notify.hub.stop()


PROJECT = "web"


class KeyClient:
    """An API client that sends one key, with JSON helpers that return (status, body)."""

    def __init__(self, raw_key: str | None, key=None):
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


def assert_error(status, body, code, kind):
    """The one error envelope: {"error": {"kind", "message", "details"}} with this status and kind."""
    assert status == code, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"kind", "message", "details"}, body
    assert body["error"]["kind"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)


def make_key(role: str, *, tenant: str = TENANT, project: str | None = PROJECT, run: str | None = None) -> KeyClient:
    key, raw = api_key_create(tenant_id=tenant, project_id=project, role=role, run_id=run)
    return KeyClient(raw, key)


@pytest.fixture
def client_api(db):
    return make_key("client")


@pytest.fixture
def runner_api(db):
    return make_key("runner")


@pytest.fixture
def operator_api(db):
    return make_key("operator")


@pytest.fixture
def anonymous_api(db):
    return KeyClient(None)


def make_run(*, tenant=TENANT, project=PROJECT, backend="echo", session_id: str | None = None, **kwargs):
    session_ref = kwargs.pop("session_ref", None)
    if session_id is not None:
        session_ref = {"sessionId": session_id, **(session_ref or {})}
    run, _ = services.run_create(
        tenant_id=tenant, project_id=project, backend_profile=backend, session_ref=session_ref, **kwargs
    )
    return run


def in_threads(count: int, work) -> list:
    """work(i) in `count` threads at once, each closing its database connection; the results."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def one(index):
        try:
            return work(index)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def wait_for(condition, timeout=30.0, step=0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def claim(run, runner_id="runner-1", lease_ms=60_000):
    return services.run_claim(run_id=run.id, runner_id=runner_id, lease_ms=lease_ms)


def events_of(run_id):
    from runs.models import RunEvent

    return list(RunEvent.objects.filter(run_id=run_id).order_by("seq"))


def phases(run_id):
    return [(e.type, e.payload.get("phase")) for e in events_of(run_id)]
