"""Queue tasks: create, idempotency, attempts, cancel, read, list, stats, the commander."""

from __future__ import annotations

import pytest
from django.db import transaction

from agentrun import counters
from agentrun.auth import Scope
from agentrun.errors import AgentRunError
from agentrun.ids import stable_hash
from queues import selectors, services
from queues.models import QueueAttempt, QueueReadCursor, QueueTask
from runs.models import Run
from tests.helpers import PROJECT, TENANT, finish_run, make_task

pytestmark = pytest.mark.django_db
SCOPE = Scope(tenant_id=TENANT, project_id=PROJECT)


def test_create_sets_the_defaults_and_takes_the_next_queue_version():
    first = make_task()
    task = make_task(session_ref={"sessionId": "a b:c!*'()ü?"})
    assert task.state == "pending" and task.latest_attempt is None and task.cancelled_at is None
    assert task.version == first.version + 1
    assert task.session_path == "/api/v1/sessions/a%20b%3Ac!*'()%C3%BC%3F"  # encodeURIComponent
    assert first.session_path is None
    expected = stable_hash(
        {
            "tenantId": TENANT,
            "projectId": PROJECT,
            "queue": "default",
            "lane": "main",
            "title": "a task",
            "priority": 0,
            "backendProfile": "echo",
            "providerId": None,
            "workspaceRef": None,
            "sessionRef": {"sessionId": "a b:c!*'()ü?"},
            "executionPolicy": None,
            "resourceBundleRef": None,
            "payload": {"prompt": "do the thing"},
            "references": None,
            "metadata": None,
        }
    )
    assert task.payload_hash == expected


def test_idempotency_key_replays_per_tenant_and_project():
    task = make_task(key="k1")
    again, created = services.task_create(
        tenant_id=TENANT,
        project_id=PROJECT,
        queue="default",
        lane="main",
        title="a task",
        priority=0,
        backend_profile="echo",
        payload={"prompt": "do the thing"},
        idempotency_key="k1",
    )
    assert again.id == task.id and not created
    with pytest.raises(AgentRunError) as error:
        make_task(key="k1", payload={"prompt": "other"})
    assert (error.value.status, error.value.kind) == (409, "schema-invalid")
    with pytest.raises(AgentRunError):
        make_task("other-queue", key="k1")  # the lookup spans queues; the queue is hashed
    services.task_cancel(task_id=task.id)
    assert make_task(key="k1").id == task.id  # replayed even when terminal
    assert make_task(key="k1", project="p2").id != task.id


def test_create_rejects_bad_refs_and_backends():
    for fields in (
        {"backend_profile": "gpt"},
        {"session_ref": {"sessionId": ""}},
        {"resource_bundle_ref": {"kind": "git"}},
    ):
        with pytest.raises(AgentRunError) as error:
            make_task(**fields)
        assert error.value.status == 400
    assert not QueueTask.objects.exists()


def test_attempt_update_overwrites_and_bumps_then_refuses_terminal_tasks():
    task = make_task()
    updated = services.task_attempt_update(
        task_id=task.id, state="running", latest_attempt={"runId": "r1"}, session_path=None
    )
    assert (updated.state, updated.latest_attempt, updated.version) == ("running", {"runId": "r1"}, task.version + 1)
    with pytest.raises(AgentRunError) as error:
        services.task_attempt_update(task_id=task.id, state="sleeping", latest_attempt=None, session_path=None)
    assert error.value.status == 400
    services.task_attempt_update(task_id=task.id, state="failed", latest_attempt=None, session_path=None)
    with pytest.raises(AgentRunError) as error:
        services.task_attempt_update(task_id=task.id, state="pending", latest_attempt=None, session_path=None)
    assert (error.value.status, error.value.kind) == (409, "schema-invalid")
    other = make_task()
    services.task_cancel(task_id=other.id)
    with pytest.raises(AgentRunError) as error:
        services.task_attempt_update(task_id=other.id, state="pending", latest_attempt=None, session_path=None)
    assert (error.value.status, error.value.kind) == (409, "cancelled")


def test_cancel_a_pending_task():
    task = make_task()
    cancelled = services.task_cancel(task_id=task.id)
    assert (cancelled.state, cancelled.cancel_reason, cancelled.latest_attempt) == (
        "cancelled",
        "cancel requested",
        None,
    )
    assert cancelled.version > task.version and cancelled.cancelled_at == cancelled.updated_at
    again = services.task_cancel(task_id=task.id, reason="twice")
    assert (again.version, again.cancel_reason) == (cancelled.version, "cancel requested")


def test_cancel_cascades_to_the_attempt_run_in_one_transaction():
    task = make_task()
    started = services.dispatch_one()
    cancelled = services.task_cancel(task_id=task.id, reason="not needed")
    run = Run.objects.get(pk=started.run_id)
    assert run.status == "cancelled" and run.failure_message == "not needed"
    assert cancelled.latest_attempt["state"] == "cancelled"
    assert QueueAttempt.objects.get(task_id=task.id).state == "cancelled"


def test_cancel_keeps_the_outcome_of_a_run_that_already_ended():
    task = make_task()
    started = services.dispatch_one()
    finish_run(started.run_id)
    cancelled = services.task_cancel(task_id=task.id)
    assert cancelled.state == "cancelled" and cancelled.latest_attempt["state"] == "completed"
    assert Run.objects.get(pk=started.run_id).status == "completed"


def test_cancel_with_a_missing_run_still_cancels():
    task = make_task()
    services.task_attempt_update(
        task_id=task.id, state="running", latest_attempt={"runId": "run_gone"}, session_path=None
    )
    assert services.task_cancel(task_id=task.id).state == "cancelled"  # A16


def test_read_cursor_and_scope():
    task = make_task()
    cursor = services.task_mark_read(task_id=task.id, reader_id="ana", scope=SCOPE)
    assert (cursor.task_id, cursor.reader_id, cursor.task_version) == (task.id, "ana", task.version)
    assert QueueTask.objects.get(pk=task.id).version == task.version
    with pytest.raises(AgentRunError) as error:
        services.task_mark_read(task_id=task.id, reader_id="ana", scope=Scope(tenant_id="other"))
    assert error.value.status == 404


def test_mark_read_is_a_transaction_of_its_own_like_a_sessions():
    task = make_task()
    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        services.task_mark_read(task_id=task.id, reader_id="ana", scope=SCOPE)
    assert not QueueReadCursor.objects.filter(task_id=task.id).exists()


def test_feed_and_priority_view():
    low = make_task(priority=1)
    high = make_task(priority=5)
    mid = make_task(priority=3)
    later_high = make_task(priority=5)
    page = selectors.task_list(scope=SCOPE, limit=2)
    assert [t.id for t in page.tasks] == [high.id, later_high.id]
    assert page.cursor == str(later_high.version)  # the highest matching version
    rest = selectors.task_list(scope=SCOPE, limit=2, page_token=page.next_page_token)
    assert [t.id for t in rest.tasks] == [mid.id, low.id] and rest.next_page_token is None
    feed = selectors.task_list(scope=SCOPE, cursor=high.version)
    assert [t.id for t in feed.tasks] == [mid.id, later_high.id] and feed.cursor == str(later_high.version)
    services.task_cancel(task_id=low.id)
    feed = selectors.task_list(scope=SCOPE, cursor=int(feed.cursor))
    assert [t.id for t in feed.tasks] == [low.id]
    empty = selectors.task_list(scope=SCOPE, cursor=int(feed.cursor))
    assert empty.tasks == [] and empty.cursor == feed.cursor
    assert [t.id for t in selectors.task_list(scope=SCOPE, state="cancelled").tasks] == [low.id]
    with pytest.raises(AgentRunError):
        selectors.task_list(scope=SCOPE, state="done")
    with pytest.raises(AgentRunError):
        selectors.task_list(scope=SCOPE, page_token=page.next_page_token, state="pending")


def test_stats_count_by_state_and_lane_in_scope():
    make_task(lane="a")
    make_task(lane="a")
    cancelled = make_task(lane="b")
    services.task_cancel(task_id=cancelled.id)
    make_task("other", lane="c")
    make_task(tenant="t2")
    stats = selectors.task_stats(scope=SCOPE)
    assert stats["total"] == 4 and stats["byState"] == {"pending": 3, "cancelled": 1}
    assert stats["byLane"] == {"a": 2, "b": 1, "c": 1}
    assert stats["maxVersion"] == QueueTask.objects.filter(tenant_id=TENANT).order_by("-version")[0].version
    one = selectors.task_stats(scope=SCOPE, queue="other")
    assert one["total"] == 1 and one["queue"] == "other"
    assert selectors.task_stats(scope=SCOPE, queue="none")["maxVersion"] == 0


def test_commander_orders_active_then_unread_then_priority():
    done_read = make_task(priority=9)
    done_unread = make_task(priority=1)
    pending_low = make_task(priority=0)
    pending_high = make_task(priority=2)
    for task in (done_read, done_unread):
        services.task_cancel(task_id=task.id)
    services.task_mark_read(task_id=done_read.id, reader_id="ana", scope=SCOPE)
    snapshot = selectors.commander(scope=SCOPE, reader_id="ana")
    assert [t.id for t in snapshot["items"]] == [pending_high.id, pending_low.id, done_unread.id]
    assert snapshot["stats"]["total"] == 4 and snapshot["stats"]["generatedAt"] == snapshot["generatedAt"]
    everyone = selectors.commander(scope=SCOPE)
    assert [t.id for t in everyone["items"]] == [pending_high.id, pending_low.id, done_read.id, done_unread.id]


def test_commander_shows_at_most_twenty_of_the_tenant():
    for index in range(25):
        make_task(priority=index)
    make_task(tenant="t2", priority=100)
    snapshot = selectors.commander(scope=Scope(tenant_id=TENANT))
    assert len(snapshot["items"]) == 20 and snapshot["items"][0].priority == 24
    assert snapshot["stats"]["total"] == 25


def test_queue_versions_come_from_their_own_counter():
    task = make_task()
    assert counters.next_version(counters.QUEUE) == task.version + 1
