"""Limits over a real socket, against gunicorn: a client still sending a body that is too large
reads the 413 envelope (httpx, as the runner and SDK send); request lines up to 8 KiB reach the
API, which answers an over-long parameter in its envelope; a chunked body is read as any other."""

from __future__ import annotations

import httpx
import pytest

from agentrun.auth import api_key_create
from runs import services
from runs.models import Run, RunEvent
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, gunicorn

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory):
    with django_db_blocker.unblock(), gunicorn(tmp_path_factory.mktemp("limits"), workers=1, threads=4) as url:
        yield url


def client(server, role="client") -> httpx.Client:
    raw = api_key_create(tenant_id=TENANT, project_id=PROJECT, role=role)[1]
    return httpx.Client(base_url=f"{server}/api/v1/", headers={"Authorization": f"Bearer {raw}"}, timeout=30)


def assert_envelope(response: httpx.Response, status: int, kind: str = "schema-invalid") -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["kind"] == kind
    return body


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 1536 * 1024, 8 * 1024 * 1024])
def test_httpx_reads_the_413_of_a_body_over_1_mib(server, size):
    with client(server) as api:
        body = {"backendProfile": "echo", "metadata": {"blob": "x" * size}}
        answer = assert_envelope(api.post("runs", json=body), 413)
        assert answer["error"]["details"] == {"limitBytes": 1024 * 1024}
        # The connection (or a new one) still works after.
        assert api.get("backends").status_code == 200
    assert not Run.objects.exists()


def test_a_runner_batch_over_1_mib_is_413_and_writes_nothing(server):
    run = services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")[0]
    services.run_claim(run_id=run.id, runner_id="runner-1", lease_ms=600_000)
    before = RunEvent.objects.filter(run_id=run.id).count()
    events = [{"type": "command_output", "payload": {"text": "y" * 200_000}} for _ in range(8)]
    with client(server, "runner") as api:
        assert_envelope(
            api.post(f"runs/{run.id}/events", json={"runnerId": "runner-1", "leaseEpoch": 1, "events": events}), 413
        )
        answer = assert_envelope(
            api.post(
                f"runs/{run.id}/events",
                json={
                    "runnerId": "runner-1",
                    "leaseEpoch": 1,
                    "type": "command_output",
                    "payload": {"text": "z" * 300_000},
                },
            ),
            413,
        )
        assert answer["error"]["details"]["index"] == 0
    assert RunEvent.objects.filter(run_id=run.id).count() == before


def test_request_lines_up_to_8_kib_reach_the_api(server):
    with client(server) as api:
        # A request line just under 8 KiB: the over-long reader id is the API's own 400.
        reader = "r" * 7900
        answer = assert_envelope(api.get("sessions", params={"readerId": reader}), 400)
        assert answer["error"]["details"]["parameter"] == "readerId"
        assert api.get("sessions", params={"readerId": "r" * 200}).status_code == 200


def test_a_chunked_body_is_read_and_one_over_the_limit_is_413(server):
    def chunks(total: int, piece: bytes):
        yield b'{"backendProfile": "echo", "metadata": {"blob": "'
        sent = 0
        while sent < total:
            yield piece
            sent += len(piece)
        yield b'"}}'

    with client(server) as api:
        response = api.post("runs", content=chunks(10_000, b"a" * 1000), headers={"content-type": "application/json"})
        assert response.status_code == 201, response.text
        assert len(Run.objects.get(pk=response.json()["id"]).metadata["blob"]) == 10_000
        assert_envelope(
            api.post(
                "runs", content=chunks(2 * 1024 * 1024, b"b" * 65536), headers={"content-type": "application/json"}
            ),
            413,
        )
    assert Run.objects.count() == 1


def test_a_raw_percent_encoded_session_id_over_a_socket(server):
    """gunicorn's raw URI keeps %2F: a session id with '/' round-trips through a real server."""
    with client(server) as api:
        response = api.put("sessions/owner%2Frepo%2342", json={"backendProfile": "echo"})
        assert response.status_code == 201, response.text
        assert response.json()["sessionId"] == "owner/repo#42"
        assert api.get("sessions/owner%2Frepo%2342").json()["sessionId"] == "owner/repo#42"
        assert api.post("sessions/owner%2Frepo%2342/read", json={"readerId": "me"}).status_code == 200
        assert_envelope(api.get("sessions/owner/repo%2342"), 404)
        answer = assert_envelope(api.get("sessions/caf%C3%A9%2Fx"), 404)
        assert answer["error"]["message"] == "session café/x was not found"
    assert list(Session.objects.values_list("pk", flat=True)) == ["owner/repo#42"]
