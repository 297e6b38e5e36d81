"""The queue under races, with real threads on the real database."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from queues import services
from queues.dispatcher import Dispatcher
from queues.models import Queue, QueueAttempt, QueueTask, TenantLimit
from runs.models import Run
from tests.helpers import PROJECT, TENANT, Threads, finish_run, in_threads, make_task, settle_all, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def bulk_tasks(count, queue="bulk", tenant=TENANT, **fields):
    """Many pending tasks at once (services.task_create for each would take a while)."""
    from agentrun import counters
    from agentrun.clock import db_now

    at = db_now()
    QueueTask.objects.bulk_create(
        [
            QueueTask(
                id=f"qt_{queue}_{i:05d}",
                tenant_id=tenant,
                project_id=PROJECT,
                queue=queue,
                lane="l",
                title="t",
                priority=i % 7,
                backend_profile="echo",
                payload={"prompt": f"task {i}"},
                state="pending",
                version=counters.next_version(counters.QUEUE),
                payload_hash="x",
                created_at=at,
                updated_at=at,
                **fields,
            )
            for i in range(count)
        ]
    )


def drain(_index):
    started = []
    while (one := services.dispatch_one()) is not None:
        started.append(one.task_id)
    return started


def test_two_dispatchers_over_a_thousand_tasks_start_each_once():
    bulk_tasks(1000)
    results = in_threads(2, drain)
    started = [task_id for batch in results for task_id in batch]
    assert len(started) == 1000 and len(set(started)) == 1000
    assert all(results)  # both took part
    assert QueueAttempt.objects.count() == 1000 and Run.objects.count() == 1000
    per_task = Counter(QueueAttempt.objects.values_list("task_id", flat=True))
    assert set(per_task.values()) == {1}
    assert set(QueueTask.objects.values_list("state", flat=True)) == {"running"}


def test_concurrency_limits_hold_under_racing_dispatchers():
    Queue.objects.create(tenant_id=TENANT, name="a", max_running=3)
    TenantLimit.objects.create(tenant_id=TENANT, max_running=5)
    bulk_tasks(60, queue="a")
    bulk_tasks(60, queue="b")
    stop = threading.Event()
    observed = []

    def watch(_):
        while not stop.is_set():
            running = Counter(QueueTask.objects.filter(state="running").values_list("queue", flat=True))
            observed.append((running["a"], sum(running.values())))
        return None

    def dispatch(_):
        while not stop.is_set():
            if services.dispatch_one() is None:
                stop.wait(0.005)  # pacing: an idle dispatcher asks again soon, without spinning

    def finish(_):
        while not stop.is_set():
            for task in QueueTask.objects.filter(state="running"):
                run_id = task.latest_attempt["runId"]
                if Run.objects.filter(pk=run_id, status="pending").exists():
                    finish_run(run_id)
            settle_all()
            if not QueueTask.objects.exclude(state="completed").exists():
                stop.set()

    def role(index):
        return (watch, finish, dispatch, dispatch, dispatch, dispatch)[index](index)

    deadline = threading.Timer(90, stop.set)
    deadline.start()
    in_threads(6, role)
    deadline.cancel()
    assert set(QueueTask.objects.values_list("state", flat=True)) == {"completed"}
    assert observed and max(a for a, _ in observed) <= 3 and max(total for _, total in observed) <= 5
    assert max(a for a, _ in observed) == 3 and max(total for _, total in observed) == 5  # the limits were reached
    # Exact, from the attempts' own times: never more than 3 (queue a) or 5 (tenant) at once.
    spans = list(QueueAttempt.objects.values_list("task__queue", "started_at", "finished_at"))
    for at in {start for _, start, _ in spans}:
        live = [queue for queue, start, end in spans if start <= at < end]
        assert live.count("a") <= 3 and len(live) <= 5


def test_cancel_during_dispatch_leaves_no_orphan_run():
    bulk_tasks(200)
    ids = sorted(QueueTask.objects.values_list("id", flat=True))

    def work(index):
        if index < 2:
            return drain(index)
        for task_id in ids[index - 2 :: 2]:
            services.task_cancel(task_id=task_id, reason="changed my mind")
        return None

    in_threads(4, work)
    assert set(QueueTask.objects.values_list("state", flat=True)) <= {"cancelled", "running"}
    cancelled = set(QueueTask.objects.filter(state="cancelled").values_list("id", flat=True))
    assert cancelled == set(ids)  # every task was cancelled, dispatched first or not
    live = Run.objects.filter(status__in=["pending", "claimed"])
    assert not live.exists(), [run.extra for run in live[:5]]
    for attempt in QueueAttempt.objects.all():
        assert attempt.state == "cancelled"
        assert Run.objects.get(pk=attempt.run_id).status == "cancelled"


def test_racing_creates_with_one_key_make_one_task():
    results = in_threads(
        20,
        lambda i: services.task_create(
            tenant_id=TENANT,
            project_id=PROJECT,
            queue="q",
            lane="l",
            title="t",
            priority=0,
            backend_profile="echo",
            payload={"prompt": "same"},
            idempotency_key="once",
        ),
    )
    assert len({task.id for task, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert QueueTask.objects.count() == 1


def test_the_served_dispatcher_wakes_on_notifications():
    stop, passes = threading.Event(), []
    dispatcher = Dispatcher()
    one_pass = dispatcher.step

    def step():
        passes.append(one_pass())
        return passes[-1]

    dispatcher.step = step
    serving = Threads(1, lambda _: dispatcher.serve(stop))
    try:
        # Its first pass is done, and it listened before it: it sleeps until notified (or 30 s).
        assert wait_for(lambda: passes, 10)
        task = make_task()
        assert wait_for(lambda: QueueTask.objects.get(pk=task.id).state == "running", 5)
        finish_run(QueueTask.objects.get(pk=task.id).latest_attempt["runId"])
        assert wait_for(lambda: QueueTask.objects.get(pk=task.id).state == "completed", 5)
    finally:
        stop.set()
        serving.join(10)
