"""A page token is the server's own (base64 JSON), but a client can send anything as `pageToken`:
a token whose fields were changed is 400 `schema-invalid` naming it, or a page, never a 500. Text
PostgreSQL cannot store in the token's id (U+0000, an unpaired surrogate) was a 500."""

from __future__ import annotations

import base64
import json

import pytest

from queues import services as queue_services
from tests.helpers import PROJECT, TENANT, make_run

pytestmark = pytest.mark.django_db

HOSTILE = [
    "\x00",
    "\ud800",
    "a\udfffb",
    "x" * 10_000,
    10**30,
    -1,
    1.5,
    True,
    None,
    [],
    {},
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "2020-01-01T00:00:00",
]


def decode(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def encode(value: dict) -> str:
    # ensure_ascii keeps a lone surrogate as its \u escape, as a forger would write it.
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def forged(token: dict, path: tuple[str, ...], value) -> dict:
    copy = json.loads(json.dumps(token))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


@pytest.fixture
def session_token(client_api):
    make_run(session_id="s1")
    make_run(session_id="s2")
    status, page = client_api.get("sessions", limit=1)
    assert status == 200 and page["nextPageToken"]
    return decode(page["nextPageToken"])


@pytest.fixture
def task_token(client_api):
    for priority in range(2):
        queue_services.task_create(
            tenant_id=TENANT,
            project_id=PROJECT,
            queue="q",
            lane="default",
            title="t",
            priority=priority,
            backend_profile="echo",
        )
    status, page = client_api.get("queue-tasks", limit=1)
    assert status == 200 and page["nextPageToken"]
    return decode(page["nextPageToken"])


def assert_refused_or_paged(status, body):
    assert status in (200, 400), (status, body)
    if status == 400:
        assert body["error"]["kind"] == "schema-invalid"
        assert body["error"]["details"]["parameter"] == "pageToken"


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("path", [("k", "i"), ("k", "a"), ("k", "u"), ("k", "g"), ("k",), ("e",), ("p",), ("f",)])
def test_a_forged_inbox_token_is_400_or_a_page(client_api, session_token, path, value):
    assert_refused_or_paged(*client_api.get("sessions", limit=1, pageToken=encode(forged(session_token, path, value))))


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("path", [("i",), ("c",), ("p",), ("f",)])
def test_a_forged_priority_token_is_400_or_a_page(client_api, task_token, path, value):
    status, body = client_api.get("queue-tasks", limit=1, pageToken=encode(forged(task_token, path, value)))
    assert_refused_or_paged(status, body)


@pytest.mark.parametrize("listing", ["sessions", "queue-tasks"])
def test_an_unstorable_id_in_a_token_is_refused(client_api, session_token, task_token, listing):
    token = forged(session_token, ("k", "i"), "\ud800") if listing == "sessions" else forged(task_token, ("i",), "\x00")
    status, body = client_api.get(listing, limit=1, pageToken=encode(token))
    assert status == 400 and body["error"]["details"]["parameter"] == "pageToken", body
