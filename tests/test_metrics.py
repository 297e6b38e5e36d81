"""/metrics: parsed with prometheus-client's own text parser, its figures move as runs, events,
queue tasks, reaps, GC passes and failed launches happen; the bearer token when one is set."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from agentrun import metrics
from agentrun.clock import db_now
from runs import launching, reaping, services
from runs.models import Run
from tests.helpers import claim, make_run, make_task
from tests.helpers.launchers import RecordingLauncher

pytestmark = pytest.mark.django_db


def scrape(client: Client | None = None, **headers) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted labels) -> value."""
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_route_template_method_and_status(client_api):
    before = scrape()
    created = [client_api.post("runs", {"backendProfile": "echo"})[1]["id"] for _ in range(3)]
    for run_id in created:
        assert client_api.get(f"runs/{run_id}")[0] == 200
    assert client_api.get("runs/run_nope")[0] == 404
    after = scrape()
    route = "/api/v1/runs/{pk}"
    assert (
        value(after, "agentrun_http_requests_total", route="/api/v1/runs", method="POST", status="201")
        - value(before, "agentrun_http_requests_total", route="/api/v1/runs", method="POST", status="201")
        == 3
    )
    assert (
        value(after, "agentrun_http_requests_total", route=route, method="GET", status="200")
        - value(before, "agentrun_http_requests_total", route=route, method="GET", status="200")
        == 3
    )
    assert (
        value(after, "agentrun_http_requests_total", route=route, method="GET", status="404")
        - value(before, "agentrun_http_requests_total", route=route, method="GET", status="404")
        == 1
    )
    # Latency: every timed request landed in the histogram, and no id leaked into a label.
    count = value(after, "agentrun_http_request_duration_seconds_count", route=route, method="GET")
    assert count - value(before, "agentrun_http_request_duration_seconds_count", route=route, method="GET") == 4
    assert not any(run_id in str(labels) for _, labels in after for run_id in created)


def test_unrouted_paths_share_one_label():
    client = Client()
    for path in ("/nope/1", "/nope/2", "/api/v1/also-nope"):
        client.get(path)
    samples = scrape()
    assert value(samples, "agentrun_http_requests_total", route="unmatched", method="GET", status="404") >= 3
    assert not any("nope" in str(labels) for _, labels in samples)


def test_runs_by_status_and_events_appended_move(django_capture_on_commit_callbacks):
    before = scrape()
    with django_capture_on_commit_callbacks(execute=True):
        runs = [make_run() for _ in range(3)]
        claimed = claim(runs[0])
        services.event_append(
            run_id=claimed.id,
            runner_id="runner-1",
            lease_epoch=claimed.lease_epoch,
            events=[("assistant_message", {"text": f"line {n}"}) for n in range(5)],
        )
    after = scrape()
    assert value(after, "agentrun_runs", status="pending") - value(before, "agentrun_runs", status="pending") == 2
    assert value(after, "agentrun_runs", status="claimed") - value(before, "agentrun_runs", status="claimed") == 1
    appended = value(after, "agentrun_events_appended_total") - value(before, "agentrun_events_appended_total")
    assert appended >= 5  # the five messages (and whatever creating and claiming wrote)


def test_queue_depth_oldest_ready_and_running_attempts():
    from queues.dispatcher import Dispatcher

    make_task("metrics-q")
    old = make_task("metrics-q")
    from queues.models import QueueTask

    QueueTask.objects.filter(pk=old.id).update(created_at=db_now() - timedelta(minutes=10))
    samples = scrape()
    labels = {"tenant": "acme", "queue": "metrics-q"}
    assert value(samples, "agentrun_queue_depth", **labels) == 2
    assert 600 <= value(samples, "agentrun_queue_oldest_ready_seconds", **labels) < 700
    Dispatcher().run_once()
    samples = scrape()
    assert value(samples, "agentrun_queue_attempts_running", **labels) >= 1
    assert value(samples, "agentrun_queue_depth", **labels) <= 1


def test_lapsed_leases_and_reaps_by_reason(settings):
    settings.AGENTRUN_REAP_GRACE_SECONDS = 30
    run = make_run()
    claim(run)
    Run.objects.filter(pk=run.id).update(lease_expires_at=db_now() - timedelta(seconds=31))
    before = scrape()
    assert value(before, "agentrun_leases_lapsed") >= 1
    [reaped] = reaping.reap()
    assert reaped.run_id == run.id
    after = scrape()
    assert (
        value(after, "agentrun_reaps_total", reason="runner-lost")
        - value(before, "agentrun_reaps_total", reason="runner-lost")
        == 1
    )
    assert value(after, "agentrun_leases_lapsed") == value(before, "agentrun_leases_lapsed") - 1
    make_run_lapsed = make_run()
    claim(make_run_lapsed)
    Run.objects.filter(pk=make_run_lapsed.id).update(lease_expires_at=db_now() - timedelta(seconds=31))
    assert len(reaping.reap(dry_run=True)) == 1  # a dry run counts nothing
    assert value(scrape(), "agentrun_reaps_total", reason="runner-lost") == value(
        after, "agentrun_reaps_total", reason="runner-lost"
    )


class _Broken(RecordingLauncher):
    name = "broken"

    def launch(self, spec):
        raise RuntimeError("no cluster")


def test_launcher_failures_and_gc_results_are_counted():
    before = scrape()
    make_run()
    assert launching.launch_pending(_Broken(alive=False)) == 0
    call_command("gc_sessions", stdout=io.StringIO(), stderr=io.StringIO())
    after = scrape()
    assert (
        value(after, "agentrun_launcher_failures_total", launcher="broken")
        - value(before, "agentrun_launcher_failures_total", launcher="broken")
        == 1
    )
    # An empty pass adds nothing, but every outcome has its series, at 0 until it happens, for a
    # dashboard to graph and an alert's rate() to start from.
    for outcome in ("deleted", "absent", "failed", "skipped"):
        assert ("agentrun_gc_results_total", (("outcome", outcome),)) in after
    for action in ("fail-run", "delete-job", "delete-policy"):
        assert ("agentrun_reconciler_actions_total", (("action", action),)) in after
    assert ("agentrun_reaps_total", (("reason", "timeout"),)) in after


def test_the_token_guards_metrics_when_set(settings):
    settings.AGENTRUN_METRICS_TOKEN = "s3cret-metrics-token"
    client = Client()
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["kind"] == "auth-required"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-metrics-token").status_code == 401
    assert (
        value(scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-metrics-token"), "agentrun_runs", status="pending") >= 0
    )
    assert client.post("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token").status_code == 405


def test_open_when_no_token_is_set(settings):
    settings.AGENTRUN_METRICS_TOKEN = ""
    assert Client().get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("route", "template"),
    [
        ("api/v1/^runs/(?P<pk>[^/.]+)/claim/?$", "/api/v1/runs/{pk}/claim"),
        ("api/v1/^runs/?$", "/api/v1/runs"),
        ("admin/runs/run/<path:object_id>/change/", "/admin/runs/run/{object_id}/change/"),
        ("metrics", "/metrics"),
    ],
)
def test_route_templates(route, template):
    assert metrics.route_template(route) == template


def test_a_scrape_reads_the_database_once(django_assert_num_queries):
    """One query each: runs by status, lapsed leases, pending tasks, running attempts, tallies,
    and the time; registering the collector does not run it a second time."""
    make_run()
    with django_assert_num_queries(6):
        assert Client().get("/metrics").status_code == 200
