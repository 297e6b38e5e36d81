"""HTTP tests for limits and bad input, unknown routes and methods, and production without a database."""

from __future__ import annotations

import json

import pytest
from django.test import override_settings

from runs import services
from runs.models import Command, Run, RunEvent
from tests.helpers import KeyClient, assert_error, claim, make_key, make_run

pytestmark = pytest.mark.django_db


def claimed_run():
    return claim(make_run())


# --- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("resource", ["events", "commands"])
@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5", "1e3"])
def test_bad_limit_is_400(client_api, resource, limit):
    run = make_run()
    assert_error(*client_api.get(f"runs/{run.id}/{resource}", limit=limit), 400, "schema-invalid")


@pytest.mark.parametrize("resource", ["events", "commands"])
@pytest.mark.parametrize("after_seq", ["-1", "abc", "0x10"])
def test_bad_after_seq_is_400(client_api, resource, after_seq):
    run = make_run()
    assert_error(*client_api.get(f"runs/{run.id}/{resource}", afterSeq=after_seq), 400, "schema-invalid")


@pytest.mark.parametrize("resource", ["events", "commands"])
@pytest.mark.parametrize("wait", ["-1", "abc", "nan"])
def test_bad_wait_is_400(client_api, resource, wait):
    run = make_run()
    assert_error(*client_api.get(f"runs/{run.id}/{resource}", wait=wait), 400, "schema-invalid")


def test_wait_above_30_is_clamped_not_refused(client_api):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={})
    for resource in ("events", "commands"):
        status, page = client_api.get(f"runs/{run.id}/{resource}", wait="100")
        assert status == 200 and page["count"] >= 1


def test_events_limit_clamps_to_500(client_api):
    run = claimed_run()
    services.event_append(run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("usage", {})] * 500)
    assert RunEvent.objects.filter(run_id=run.id).count() == 502
    status, page = client_api.get(f"runs/{run.id}/events", limit=10000)
    assert status == 200 and page["count"] == 500 and page["cursor"] == "500"
    status, page = client_api.get(f"runs/{run.id}/events", afterSeq=500, limit=10000)
    assert page["count"] == 2 and page["cursor"] == "502"


def test_events_default_limit_is_100(client_api):
    run = claimed_run()
    services.event_append(run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("usage", {})] * 150)
    status, page = client_api.get(f"runs/{run.id}/events")
    assert status == 200 and page["count"] == 100


# --- bodies ------------------------------------------------------------------------------------


def test_malformed_json_is_400(client_api, runner_api):
    run = make_run()
    assert_error(*client_api.raw("post", "runs", b'{"backendProfile": "echo"'), 400, "schema-invalid")
    assert_error(*runner_api.raw("post", f"runs/{run.id}/claim", b"{runnerId: x}"), 400, "schema-invalid")
    assert_error(*runner_api.raw("post", f"runs/{run.id}/events", b"not json"), 400, "schema-invalid")
    assert Run.objects.count() == 1
    assert Run.objects.get(pk=run.id).lease_epoch == 0


@pytest.mark.parametrize("body", [[1, 2], "text", None])
def test_body_not_an_object_is_400(client_api, runner_api, body):
    run = claimed_run()
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={})
    raw = json.dumps(body).encode()
    calls = [
        (client_api, "runs"),
        (client_api, f"runs/{run.id}/commands"),
        (client_api, f"runs/{run.id}/cancel"),
        (client_api, f"commands/{command.id}/cancel"),
        (runner_api, f"runs/{run.id}/claim"),
        (runner_api, f"runs/{run.id}/heartbeat"),
        (runner_api, f"runs/{run.id}/finish"),
        (runner_api, f"runs/{run.id}/events"),
        (runner_api, f"runs/{run.id}/runner-jobs"),
        (runner_api, f"commands/{command.id}/ack"),
        (runner_api, f"commands/{command.id}/finish"),
        (runner_api, "runners"),
    ]
    events = RunEvent.objects.filter(run_id=run.id).count()
    for api, path in calls:
        status, answer = api.raw("post", path, raw)
        assert_error(status, answer, 400, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == events
    assert Run.objects.get(pk=run.id).status == "claimed"
    assert Command.objects.get(pk=command.id).state == "pending"


@pytest.mark.parametrize(
    "bad",
    [
        {"leaseEpoch": "1"},
        {"runnerId": 5},
        {"leaseEpoch": 1.5},
        {"leaseEpoch": True},
        {"leaseEpoch": None},
        {"leaseEpoch": -1},
        {"runnerId": ""},
    ],
)
def test_wrong_types_in_runner_calls_are_400(runner_api, bad):
    run = claimed_run()
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={})
    base = {"runnerId": "runner-1", "leaseEpoch": 1}
    calls = [
        (f"runs/{run.id}/heartbeat", {}),
        (f"runs/{run.id}/finish", {"terminalStatus": "completed"}),
        (f"runs/{run.id}/events", {"type": "usage", "payload": {}}),
        (f"runs/{run.id}/events", {"events": [{"type": "usage", "payload": {}}]}),
        (f"commands/{command.id}/ack", {}),
        (f"commands/{command.id}/finish", {"terminalStatus": "completed"}),
    ]
    events = RunEvent.objects.filter(run_id=run.id).count()
    for path, extra in calls:
        assert_error(*runner_api.post(path, {**base, **extra, **bad}), 400, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == events
    assert Command.objects.get(pk=command.id).state == "pending"
    assert Run.objects.get(pk=run.id).status == "claimed"


def test_claim_runner_id_must_be_a_string(runner_api):
    run = make_run()
    assert_error(*runner_api.post(f"runs/{run.id}/claim", {"runnerId": 5}), 400, "schema-invalid")
    assert_error(*runner_api.post(f"runs/{run.id}/claim", {}), 400, "schema-invalid")
    assert Run.objects.get(pk=run.id).lease_epoch == 0


def test_run_create_wrong_types_are_400(client_api):
    for body in (
        {"backendProfile": 1},
        {"backendProfile": "echo", "metadata": [1]},
        {"backendProfile": "echo", "sessionRef": "s"},
        {"backendProfile": "echo", "sessionRef": {}},
        {"backendProfile": "echo", "executionPolicy": {"maxAttempts": 0}},
        {"backendProfile": "echo", "resourceBundleRef": {"kind": "git"}},
    ):
        assert_error(*client_api.post("runs", body), 400, "schema-invalid")
    assert Run.objects.count() == 0


def test_body_over_1_mib_is_413(client_api, runner_api):
    run = claimed_run()
    big = json.dumps(
        {"runnerId": "runner-1", "leaseEpoch": 1, "type": "usage", "payload": {"blob": "x" * (1024 * 1024)}}
    ).encode()
    events = RunEvent.objects.filter(run_id=run.id).count()
    assert_error(*runner_api.raw("post", f"runs/{run.id}/events", big), 413, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == events
    big_run = json.dumps({"backendProfile": "echo", "metadata": {"x": "y" * (1024 * 1024 + 1)}}).encode()
    assert_error(*client_api.raw("post", "runs", big_run), 413, "schema-invalid")
    assert Run.objects.count() == 1


def test_body_just_under_1_mib_is_accepted(runner_api):
    """Five events of about 200 KiB each: every payload under 256 KiB, the body exactly 1 MiB."""
    run = claimed_run()
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "events": [{"type": "usage", "payload": {"blob": ""}} for _ in range(5)],
    }
    overhead = len(json.dumps(body).encode())
    share, rest = divmod(1024 * 1024 - overhead, 5)
    for index, event in enumerate(body["events"]):
        event["payload"]["blob"] = "x" * (share + (rest if index == 0 else 0))
    raw = json.dumps(body).encode()
    assert len(raw) == 1024 * 1024
    status, page = runner_api.raw("post", f"runs/{run.id}/events", raw)
    assert status == 201
    assert page["count"] == 5
    assert RunEvent.objects.filter(run_id=run.id, type="usage").count() == 5


def test_one_event_over_256_kib_is_413_with_its_index_and_nothing_is_written(runner_api):
    run = claimed_run()
    before = RunEvent.objects.filter(run_id=run.id).count()
    events = [{"type": "usage", "payload": {"n": 1}}, {"type": "usage", "payload": {"blob": "é" * (128 * 1024)}}]
    status, body = runner_api.post(f"runs/{run.id}/events", {"runnerId": "runner-1", "leaseEpoch": 1, "events": events})
    assert_error(status, body, 413, "schema-invalid")
    size = len(json.dumps(events[1]["payload"], ensure_ascii=False, separators=(",", ":")).encode())
    assert body["error"]["details"] == {"index": 1, "bytes": size, "limitBytes": 256 * 1024}
    assert RunEvent.objects.filter(run_id=run.id).count() == before
    # Just under the limit is stored.
    fits = {"blob": "x" * (256 * 1024 - len('{"blob":""}'))}
    status, _ = runner_api.post(
        f"runs/{run.id}/events", {"runnerId": "runner-1", "leaseEpoch": 1, "type": "usage", "payload": fits}
    )
    assert status == 201


# --- routes and methods ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/runs/abc/nope", "/api/v2/runs", "/api/v1/"])
def test_unknown_route_is_404_envelope(client_api, path):
    assert_error(*client_api.get(path), 404, "schema-invalid")


def test_unknown_route_is_404_envelope_without_key(anonymous_api):
    assert_error(*anonymous_api.get("/api/v1/does-not-exist"), 404, "schema-invalid")
    assert_error(*anonymous_api.post("/api/v1/does-not-exist"), 404, "schema-invalid")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("delete", "runs/{run}"),
        ("put", "runs/{run}"),
        ("patch", "runs/{run}"),
        ("get", "runs/{run}/claim"),
        ("get", "runs/{run}/heartbeat"),
        ("get", "runs/{run}/finish"),
        ("get", "runs/{run}/cancel"),
        ("delete", "runs/{run}/events"),
        ("get", "runs"),
        ("get", "runners"),
        ("get", "commands/{command}/ack"),
        ("delete", "commands/{command}"),
        ("post", "health"),
        ("post", "backends"),
    ],
)
def test_wrong_method_is_405_envelope(operator_api, method, path):
    run = make_run()
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={})
    url = "/api/v1/" + path.format(run=run.id, command=command.id)
    response = getattr(operator_api.client, method)(url)
    assert_error(response.status_code, response.json(), 405, "schema-invalid")
    assert Run.objects.filter(pk=run.id).exists()


def test_wrong_method_without_key_is_405(anonymous_api):
    run = make_run()
    response = anonymous_api.client.delete(f"/api/v1/runs/{run.id}")
    assert_error(response.status_code, response.json(), 405, "schema-invalid")


# --- production without a database ------------------------------------------------------------


@override_settings(AGENTRUN_DATABASE_MISSING=True)
def test_health_without_database_is_503_with_details():
    status, body = KeyClient(None).get("health")
    assert status == 503
    assert body["ready"] is False and body["reachable"] is False and body["migrationReady"] is False
    assert body["failureKind"] == "infra-failed"
    assert body["adapter"] == "postgres"
    assert body["credentialValuesPrinted"] is False
    assert body["details"] == {"adapter": "postgres", "databaseUrl": "missing", "memoryFallback": "disabled"}
    assert isinstance(body["message"], str) and body["message"]


@override_settings(AGENTRUN_DATABASE_MISSING=True)
def test_livez_200_and_readyz_503_without_database():
    api = KeyClient(None)
    assert api.get("/livez")[0] == 200
    assert api.get("/readyz")[0] == 503


def test_api_routes_without_database_are_503_infra_failed():
    run = make_run()
    client = make_key("client")
    runner = make_key("runner")
    with override_settings(AGENTRUN_DATABASE_MISSING=True):
        calls = [
            (client.get, ("backends",)),
            (client.get, (f"runs/{run.id}",)),
            (client.post, ("runs", {"backendProfile": "echo"})),
            (client.get, (f"runs/{run.id}/events",)),
            (client.post, (f"runs/{run.id}/commands", {"type": "turn", "payload": {}})),
            (runner.post, (f"runs/{run.id}/claim", {"runnerId": "r"})),
            (runner.post, ("runners", {})),
            (client.get, ("/api/v1/schema/",)),
            (KeyClient(None).get, ("runs/x",)),
        ]
        for call, args in calls:
            status, body = call(*args)
            assert_error(status, body, 503, "infra-failed")
            assert body["error"]["details"] == {
                "adapter": "postgres",
                "databaseUrl": "missing",
                "memoryFallback": "disabled",
            }
    assert Run.objects.count() == 1
    assert Run.objects.get(pk=run.id).lease_epoch == 0


@pytest.mark.parametrize("path", ["runs/livez", "runs/readyz", "commands/health"])
def test_paths_ending_like_health_are_not_served_without_database(path):
    """Only the health routes themselves answer without a database, not any path ending in their name."""
    with override_settings(AGENTRUN_DATABASE_MISSING=True):
        assert_error(*make_key("operator").get(path), 503, "infra-failed")
