"""Racing writes over real HTTP (gunicorn, 2 workers x 16 threads, the test database): 10 to 20
clients released at once, each race repeated. The loser of an expected conflict gets a 409 of the
right kind, a replay its 200; a deadlock or serialization failure never reaches a client; no
answer is a 5xx. Every race also checks the tables."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from agentrun.auth import api_key_create
from queues.models import QueueTask
from runs import services
from runs.models import Command, EventBatch, Run, RunEvent, Runner, RunnerJob
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, gunicorn, in_threads

pytestmark = pytest.mark.django_db(transaction=True)
ROUNDS = 3
CLIENTS = 16


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory):
    with django_db_blocker.unblock(), gunicorn(tmp_path_factory.mktemp("races")) as url:
        yield url


def key(role: str, run: str | None = None) -> str:
    return api_key_create(tenant_id=TENANT, project_id=PROJECT, role=role, run_id=run)[1]


def race(server: str, api_key: str, requests: list[tuple[str, str, dict]]) -> list[tuple[int, dict]]:
    """Send each (method, path, body) from its own client, all released together."""

    def one(index):
        method, path, body = requests[index]
        with httpx.Client(
            base_url=f"{server}/api/v1/", headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        ) as client:
            response = client.request(method, path, json=body)
            return response.status_code, response.json()

    answers = in_threads(len(requests), one)
    for status, body in answers:
        assert status < 500, body
    return answers


def statuses(answers) -> Counter:
    return Counter(status for status, _ in answers)


def held_run() -> Run:
    run = services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")[0]
    services.run_claim(run_id=run.id, runner_id="runner-1", lease_ms=600_000)
    return run


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_identical_batches_under_one_key_one_201_the_rest_200_with_the_same_items(server, round_):
    run = held_run()
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "batchKey": "runner-1:1:0",
        "events": [{"type": "command_output", "payload": {"n": n, "text": "a\x00b"}} for n in range(20)],
    }
    answers = race(server, key("runner"), [("POST", f"runs/{run.id}/events", body)] * CLIENTS)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    items = {tuple(item["id"] for item in answer["items"]) for _, answer in answers}
    assert len(items) == 1
    assert RunEvent.objects.filter(run_id=run.id, type="command_output").count() == 20
    assert EventBatch.objects.filter(run_id=run.id).count() == 1
    seqs = list(RunEvent.objects.filter(run_id=run.id).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_different_batches_under_one_key_one_201_the_rest_409(server, round_):
    run = held_run()
    requests = [
        (
            "POST",
            f"runs/{run.id}/events",
            {
                "runnerId": "runner-1",
                "leaseEpoch": 1,
                "batchKey": "k",
                "events": [{"type": "usage", "payload": {"client": index}}],
            },
        )
        for index in range(CLIENTS)
    ]
    answers = race(server, key("runner"), requests)
    assert statuses(answers) == {201: 1, 409: CLIENTS - 1}
    assert all(body["error"]["kind"] == "schema-invalid" for status, body in answers if status == 409)
    assert RunEvent.objects.filter(run_id=run.id, type="usage").count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_idempotent_command_creates(server, round_):
    run = held_run()
    body = {"type": "turn", "payload": {"prompt": "hi"}, "idempotencyKey": "turn-1"}
    answers = race(server, key("client"), [("POST", f"runs/{run.id}/commands", body)] * CLIENTS)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    assert len({answer["id"] for _, answer in answers}) == 1
    assert Command.objects.filter(run_id=run.id).count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_idempotent_run_creates(server, round_):
    body = {"backendProfile": "echo", "idempotencyKey": f"run-{round_}", "metadata": {"n": 1}}
    answers = race(server, key("client"), [("POST", "runs", body)] * CLIENTS)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    assert Run.objects.filter(idempotency_key=f"run-{round_}").count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_idempotent_runner_job_creates(server, round_):
    run = held_run()
    body = {
        "commandId": "cmd-1",
        "idempotencyKey": "launch-1",
        "payloadHash": "h",
        "attemptId": "a",
        "runnerId": "runner-1",
        "namespace": "ns",
        "jobName": "job-1",
        "managerUrl": "http://m",
        "image": "i",
        "sourceCommit": "c",
    }
    answers = race(server, key("runner"), [("POST", f"runs/{run.id}/runner-jobs", body)] * CLIENTS)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    assert RunnerJob.objects.filter(run_id=run.id).count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_idempotent_queue_task_creates(server, round_):
    body = {"queue": "q", "backendProfile": "echo", "idempotencyKey": f"task-{round_}", "payload": {"prompt": "x"}}
    answers = race(server, key("client"), [("POST", "queue-tasks", body)] * CLIENTS)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    assert QueueTask.objects.filter(idempotency_key=f"task-{round_}").count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_puts_of_a_new_session(server, round_):
    session_id = f"owner/repo#{round_}"
    path = "sessions/" + session_id.replace("/", "%2F").replace("#", "%23")
    requests = [("PUT", path, {"backendProfile": "echo", "metadata": {"title": f"t{index}"}}) for index in range(12)]
    answers = race(server, key("client"), requests)
    assert statuses(answers) == {201: 1, 200: 11}
    session = Session.objects.get(pk=session_id)
    assert session.title in {f"t{index}" for index in range(12)}
    # Every PUT took a version of its own: the winner's create and the 11 updates.
    assert len({answer["version"] for _, answer in answers}) == 12


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_runner_registrations_of_one_id(server, round_):
    runner_id = f"runner-{round_}"
    requests = [("POST", "runners", {"runnerId": runner_id, "slot": index}) for index in range(CLIENTS)]
    answers = race(server, key("runner"), requests)
    assert statuses(answers) == {201: 1, 200: CLIENTS - 1}
    assert Runner.objects.filter(pk=runner_id).count() == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_many_runs_started_at_once_in_one_new_session(server, round_):
    session_id = f"shared/{round_}"
    requests = [("POST", "runs", {"backendProfile": "echo", "sessionRef": {"sessionId": session_id}})] * CLIENTS
    answers = race(server, key("client"), requests)
    assert statuses(answers) == {201: CLIENTS}
    runs = {answer["id"] for _, answer in answers}
    assert Run.objects.filter(session_id=session_id).count() == CLIENTS
    assert Session.objects.get(pk=session_id).last_run_id in runs


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_cancel_against_finish(server, round_):
    runs = [held_run() for _ in range(CLIENTS // 2)]
    for run in runs:
        services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "x"})
    client_key, runner_key = key("client"), key("runner")
    moves = [(run, action) for run in runs for action in ("cancel", "finish")]

    def one(index):
        run, action = moves[index]
        api_key = client_key if action == "cancel" else runner_key
        body = (
            {"reason": "stop"}
            if action == "cancel"
            else {"runnerId": "runner-1", "leaseEpoch": 1, "terminalStatus": "completed"}
        )
        with httpx.Client(
            base_url=f"{server}/api/v1/", headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        ) as client:
            return client.post(f"runs/{run.id}/{action}", json=body)

    responses = in_threads(len(moves), one)
    assert [response.status_code for response in responses] == [200] * len(responses)
    for run in runs:
        run.refresh_from_db()
        assert run.status in ("cancelled", "completed")
        terminals = RunEvent.objects.filter(run_id=run.id, type="terminal_status")
        assert terminals.count() == 1
        assert terminals.get().payload["terminalStatus"] == run.terminal_status
        command = Command.objects.get(run_id=run.id)
        assert command.state == "cancelled"
        closed = [
            event
            for event in RunEvent.objects.filter(run_id=run.id)
            if event.payload.get("phase") == "command-terminal"
        ]
        assert len(closed) == 1
