"""The dispatcher: tasks into runs, runs' ends into task states, retries, limits, pause."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agentrun.clock import db_now
from queues import services
from queues.models import Queue, QueueAttempt, QueueTask, TenantLimit
from queues.services import dispatch
from runs.models import Command, Run
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, finish_run, make_run, make_task, settle_all

pytestmark = pytest.mark.django_db


def dispatch_all():
    started = []
    while (one := services.dispatch_one()) is not None:
        started.append(one)
    return started


def test_dispatch_creates_the_run_and_its_first_turn():
    bundle = {"kind": "git", "repoUrl": "https://example.com/r.git", "bundles": []}
    task = make_task(
        session_ref={"sessionId": "q-s1", "metadata": {"title": "From the queue"}},
        resource_bundle_ref=bundle,
        backend_profile="codex",
        payload={"prompt": "fix it"},
        execution_policy={"timeoutSeconds": 60},
    )
    [started] = dispatch_all()
    run = Run.objects.get(pk=started.run_id)
    assert (run.tenant_id, run.project_id, run.backend_profile) == (TENANT, PROJECT, "codex")
    assert run.session_id == "q-s1" and run.resource_bundle_ref == bundle
    assert run.execution_policy == {"timeoutSeconds": 60} and run.extra["queueTaskId"] == task.id
    command = Command.objects.get(run_id=run.id)
    assert (command.type, command.payload) == ("turn", {"prompt": "fix it"})
    stored = QueueTask.objects.get(pk=task.id)
    assert stored.state == "running" and stored.version > task.version and stored.attempt_count == 1
    assert stored.latest_attempt["runId"] == run.id and stored.latest_attempt["commandId"] == command.id
    assert stored.latest_attempt["state"] == "running" and stored.latest_attempt["number"] == 1
    assert Session.objects.get(pk="q-s1").execution_state == "running"
    assert dispatch_all() == []


def test_dispatch_order_is_priority_then_age():
    tasks = [make_task(priority=p) for p in (1, 5, 3, 5)]
    order = [s.task_id for s in dispatch_all()]
    assert order == [tasks[1].id, tasks[3].id, tasks[2].id, tasks[0].id]


def test_task_follows_its_run_to_the_end():
    outcomes = {}
    for status, kind in (("completed", None), ("failed", "agent-failed"), ("blocked", None), ("timeout", "timeout")):
        task = make_task()
        [started] = dispatch_all()
        finish_run(started.run_id, status, kind)
        outcomes[status] = task.id
    assert settle_all() == 4
    states = {status: QueueTask.objects.get(pk=task_id).state for status, task_id in outcomes.items()}
    assert states == {"completed": "completed", "failed": "failed", "blocked": "blocked", "timeout": "failed"}
    attempt = QueueAttempt.objects.get(task_id=outcomes["failed"])
    assert (attempt.state, attempt.failure_kind) == ("failed", "agent-failed") and attempt.finished_at


def test_a_run_cancelled_directly_cancels_its_task():
    from runs import services as run_services

    task = make_task()
    [started] = dispatch_all()
    run_services.run_cancel(run_id=started.run_id, reason="stop")
    settle_all()
    assert QueueTask.objects.get(pk=task.id).state == "cancelled"


def test_retryable_failures_retry_after_a_doubling_backoff():
    task = make_task(execution_policy={"maxAttempts": 3, "backoffSeconds": 20})
    [first] = dispatch_all()
    finish_run(first.run_id, "failed", "runner-lost")
    settle_all()
    stored = QueueTask.objects.get(pk=task.id)
    assert stored.state == "pending" and stored.latest_attempt["state"] == "failed"
    delay = (stored.not_before - stored.updated_at).total_seconds()
    assert delay == pytest.approx(20, abs=0.01)
    assert dispatch_all() == []  # backing off
    assert services.next_retry_at() == stored.not_before
    QueueTask.objects.filter(pk=task.id).update(not_before=db_now() - timedelta(seconds=1))
    [second] = dispatch_all()
    assert second.attempt == 2 and second.run_id != first.run_id
    finish_run(second.run_id, "failed", "infra-failed")
    settle_all()
    stored = QueueTask.objects.get(pk=task.id)
    assert (stored.not_before - stored.updated_at).total_seconds() == pytest.approx(40, abs=0.01)
    QueueTask.objects.filter(pk=task.id).update(not_before=None)
    [third] = dispatch_all()
    finish_run(third.run_id, "failed", "runner-lost")
    settle_all()
    stored = QueueTask.objects.get(pk=task.id)
    assert stored.state == "failed" and stored.attempt_count == 3  # out of attempts
    assert QueueAttempt.objects.filter(task_id=task.id).count() == 3


def test_default_policy_makes_one_attempt_and_never_retries_other_kinds():
    once = make_task()
    picky = make_task(execution_policy={"maxAttempts": 5})
    started = {s.task_id: s for s in dispatch_all()}
    finish_run(started[once.id].run_id, "failed", "runner-lost")
    finish_run(started[picky.id].run_id, "failed", "schema-invalid")
    settle_all()
    assert QueueTask.objects.get(pk=once.id).state == "failed"  # maxAttempts defaults to 1
    assert QueueTask.objects.get(pk=picky.id).state == "failed"  # schema-invalid is not retryable


def test_every_transition_bumps_the_version():
    task = make_task(execution_policy={"maxAttempts": 2, "backoffSeconds": 0})
    versions = [task.version]
    [first] = dispatch_all()
    versions.append(QueueTask.objects.get(pk=task.id).version)
    finish_run(first.run_id, "failed", "runner-lost")
    settle_all()
    versions.append(QueueTask.objects.get(pk=task.id).version)
    [second] = dispatch_all()
    versions.append(QueueTask.objects.get(pk=task.id).version)
    finish_run(second.run_id)
    settle_all()
    versions.append(QueueTask.objects.get(pk=task.id).version)
    assert versions == sorted(set(versions))


def test_a_task_whose_session_is_elsewhere_fails_without_a_run():
    make_run(session_id="theirs", tenant="t2")
    task = make_task(session_ref={"sessionId": "theirs"})
    [started] = dispatch_all()
    assert started.run_id is None
    stored = QueueTask.objects.get(pk=task.id)
    assert stored.state == "failed" and stored.latest_attempt["failureKind"] == "tenant-policy-denied"
    assert not Run.objects.filter(tenant_id=TENANT).exists()


def test_a_paused_queue_dispatches_nothing():
    Queue.objects.create(tenant_id=TENANT, name="slow", paused=True)
    paused = make_task("slow", priority=10)
    other = make_task("fast")
    assert [s.task_id for s in dispatch_all()] == [other.id]
    Queue.objects.filter(name="slow").update(paused=False)
    assert [s.task_id for s in dispatch_all()] == [paused.id]


def test_queue_and_tenant_limits_cap_running_attempts():
    Queue.objects.create(tenant_id=TENANT, name="q", max_running=2)
    tasks = [make_task("q") for _ in range(4)]
    assert len(dispatch_all()) == 2
    first = QueueTask.objects.get(pk=tasks[0].id)
    finish_run(first.latest_attempt["runId"])
    settle_all()
    assert len(dispatch_all()) == 1  # a slot came free
    TenantLimit.objects.create(tenant_id=TENANT, max_running=2)
    make_task("other")
    assert dispatch_all() == []  # the tenant runs 2 already
    assert QueueTask.objects.filter(state="running").count() == 2


def test_retry_sends_a_failed_task_back():
    task = make_task()
    [started] = dispatch_all()
    finish_run(started.run_id, "failed", "agent-failed")
    settle_all()
    retried = services.task_retry(task_id=task.id)
    assert retried.state == "pending"
    [again] = dispatch_all()
    assert again.attempt == 2
    with pytest.raises(Exception) as error:
        services.task_retry(task_id=task.id)
    assert getattr(error.value, "status", None) == 409


def test_worker_once_runs_one_dispatcher_pass():
    import io

    from django.core.management import call_command

    task = make_task()
    out = io.StringIO()
    call_command("worker", "--once", stdout=out)
    assert out.getvalue().strip().startswith("settled 0 attempt(s), dispatched 1 task(s)")
    stored = QueueTask.objects.get(pk=task.id)
    finish_run(stored.latest_attempt["runId"])
    out = io.StringIO()
    call_command("worker", "--once", stdout=out)
    assert out.getvalue().strip().startswith("settled 1 attempt(s), dispatched 0 task(s)")
    assert QueueTask.objects.get(pk=task.id).state == "completed"


def test_the_settle_pass_reads_past_a_batch_of_attempts_still_running(monkeypatch):
    monkeypatch.setattr(dispatch, "SETTLE_SCAN", 2)
    for _ in range(5):
        make_task()
    started = dispatch_all()
    assert len(started) == 5
    finish_run(started[-1].run_id, "failed", "agent-failed")  # the newest attempt, in the last batch
    Run.objects.filter(pk=started[2].run_id).delete()  # a run that is gone ends its attempt too
    ended = services.attempts_to_settle(limit=10)
    assert [(e.task_id, e.run and e.run.status) for e in ended] == [
        (started[2].task_id, None),
        (started[-1].task_id, "failed"),
    ]
    assert services.attempts_to_settle(limit=1) == ended[:1]
    assert settle_all() == 2
    assert QueueTask.objects.get(pk=started[2].task_id).latest_attempt["failureKind"] == "infra-failed"
    assert QueueTask.objects.get(pk=started[-1].task_id).latest_attempt["failureKind"] == "agent-failed"


def test_a_settle_pass_reads_the_runs_once_per_batch_and_settling_touches_no_run(django_assert_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(4):
        make_task()
    started = dispatch_all()
    for one in started[:3]:
        finish_run(one.run_id)
    with django_assert_num_queries(2) as captured:  # the open attempts, then their runs
        ended = services.attempts_to_settle(limit=10)
    assert len(ended) == 3
    assert ["runs_run" in query["sql"] for query in captured.captured_queries] == [False, True]
    with CaptureQueriesContext(connection) as settling:
        assert all(services.settle_attempt(ended=attempt) is not None for attempt in ended)
    assert not any("runs_run" in query["sql"] for query in settling.captured_queries)
    assert [QueueTask.objects.get(pk=one.task_id).state for one in started] == ["completed"] * 3 + ["running"]
