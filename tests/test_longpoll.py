"""Long-polls: answer at once when rows exist, else sleep until a commit wakes them (LISTEN/NOTIFY)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from agentrun import notify
from agentrun.errors import AgentRunError
from runs import services
from tests.helpers import Threads, make_key, make_run, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_count(topic):
    with notify.hub._lock:
        return len(notify.hub._waiters.get(topic, ()))


def test_events_answer_at_once_when_rows_exist():
    api = make_key("client")
    run = make_run()
    started = time.monotonic()
    status, body = api.get(f"runs/{run.id}/events", afterSeq="0", wait="20")
    assert status == 200 and body["count"] == 1 and body["cursor"] == "1"
    assert time.monotonic() - started < 10


def test_events_wait_wakes_on_append_commit():
    client, runner = make_key("client"), make_key("runner")
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    topic = notify.run_topic(run.id)
    started = time.monotonic()
    waiter = Threads(1, lambda _: client.get(f"runs/{run.id}/events", afterSeq="2", wait="20"))
    assert wait_for(lambda: waiting_count(topic) == 1)
    status, _ = runner.post(
        f"runs/{run.id}/events", {"runnerId": "r", "leaseEpoch": 1, "type": "assistant_message", "payload": {"t": 1}}
    )
    assert status == 201
    [(status, body)] = waiter.join(20)
    assert status == 200 and [item["seq"] for item in body["items"]] == [3] and body["cursor"] == "3"
    # Woken by the commit, not by the 20 s deadline.
    assert time.monotonic() - started < 10


def test_events_wait_times_out_with_echoed_cursor():
    api = make_key("client")
    run = make_run()
    status, body = api.get(f"runs/{run.id}/events", afterSeq="5", wait="0.2")
    assert (status, body) == (200, {"items": [], "count": 0, "cursor": "5"})


def test_commands_wait_wakes_on_command_create():
    client, runner = make_key("client"), make_key("runner")
    run = make_run()
    topic = notify.run_topic(run.id)
    waiter = Threads(1, lambda _: runner.get(f"runs/{run.id}/commands", afterSeq="0", wait="20"))
    assert wait_for(lambda: waiting_count(topic) == 1)
    status, command = client.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {"prompt": "go"}})
    assert status == 201
    [(status, body)] = waiter.join(20)
    assert status == 200 and [item["id"] for item in body["items"]] == [command["id"]]


def test_a_rolled_back_write_wakes_nobody_with_false_rows():
    api = make_key("client")
    run = make_run()
    waiter = Threads(1, lambda _: api.get(f"runs/{run.id}/events", afterSeq="1", wait="1"))
    assert wait_for(lambda: waiting_count(notify.run_topic(run.id)) == 1)
    with pytest.raises(AgentRunError):
        services.event_append(run_id=run.id, runner_id="nobody", lease_epoch=0, events=[("error", {})])
    assert waiter.join(10) == [(200, {"items": [], "count": 0, "cursor": "1"})]


def test_many_waiters_share_one_listening_connection_and_hold_no_other():
    api = make_key("client")
    runner = make_key("runner")
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    topic = notify.run_topic(run.id)
    waiters = Threads(12, lambda _: api.get(f"runs/{run.id}/events", afterSeq="2", wait="20"))
    assert wait_for(lambda: waiting_count(topic) == 12)

    def connections():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FILTER (WHERE query = 'LISTEN agentrun'), count(*) "
                "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return cursor.fetchone()

    # A waiter subscribes, checks once more, then gives its connection back before it sleeps.
    # Sleeping requests hold none: only the listener remains besides this one.
    assert wait_for(lambda: connections() == (1, 1)), connections()
    runner.post(f"runs/{run.id}/events", {"runnerId": "r", "leaseEpoch": 1, "type": "error", "payload": {}})
    assert all(body["count"] == 1 for _, body in waiters.join(20))


def test_wait_param_validation():
    api = make_key("client")
    run = make_run()
    for bad in ("-1", "abc", "nan"):
        status, body = api.get(f"runs/{run.id}/events", wait=bad)
        assert status == 400 and body["error"]["kind"] == "schema-invalid"


def test_waiters_woken_together_share_one_fetch():
    from agentrun.notify import NotificationHub

    hub = NotificationHub()
    hub._ensure_started = lambda: None  # no listener needed: wake-ups are delivered by hand
    calls = []
    release = threading.Event()

    def fetch():
        calls.append(1)
        release.wait(5)
        return ["row"]

    with hub.subscribe("t") as first, hub.subscribe("t"):
        hub._wake("t")
        fetching = Threads(10, lambda _: hub.shared_fetch("t", "k", fetch))
        assert wait_for(lambda: len(calls) == 1)
        release.set()
        assert fetching.join(5) == [["row"]] * 10 and len(calls) == 1
        # A later notification means newer rows may exist: the next waiter fetches again.
        hub._wake("t")
        assert hub.shared_fetch("t", "k", fetch) == ["row"] and len(calls) == 2
        # Another question is never answered with this one's rows.
        assert hub.shared_fetch("t", "other", fetch) == ["row"] and len(calls) == 3
        assert first.event.is_set()
    assert "t" not in hub._shared


def test_a_client_that_goes_away_leaves_no_waiter_behind():
    api = make_key("client")
    run = make_run()
    response = api.client.get(f"/api/v1/runs/{run.id}/events", {"afterSeq": "1", "wait": "20"})
    assert response.status_code == 200 and response.streaming
    topic = notify.run_topic(run.id)
    assert waiting_count(topic) == 1
    response.close()  # what the WSGI server does when the connection drops before the body
    assert waiting_count(topic) == 0


def test_session_output_waits_through_trace_only_events_until_output_arrives(monkeypatch):
    client = make_key("client")
    run = make_run(session_id="lp-session")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    topic = notify.run_topic(run.id)
    # Each time the waiter sleeps again after a wake-up: the topic's notification count at that wake-up.
    woken_at, asleep_again_after = [], []
    hub_wait = notify.hub.wait

    def wait(waiter, timeout):
        if woken_at:
            asleep_again_after.append(woken_at[-1])
        woke = hub_wait(waiter, timeout)
        if woke:
            woken_at.append(notify.hub._generations.get(waiter.topic, 0))
        return woke

    monkeypatch.setattr(notify.hub, "wait", wait)
    waiter = Threads(1, lambda _: client.get("sessions/lp-session/output", afterSeq="0", wait="20"))
    assert wait_for(lambda: waiting_count(topic) == 1)
    notified = notify.hub._generations.get(topic, 0)
    services.event_append(run_id=run.id, runner_id="r", lease_epoch=1, events=[("reasoning", {"text": "hm"})])
    # Woken by that append's notification, the waiter looked, found no output and went back to sleep.
    assert wait_for(lambda: any(count > notified for count in asleep_again_after) or not waiter.alive(), 10)
    assert waiter.alive()  # a trace-only event does not answer an output page
    services.event_append(run_id=run.id, runner_id="r", lease_epoch=1, events=[("assistant_message", {"text": "done"})])
    [(status, body)] = waiter.join(10)
    assert status == 200 and body["sessionId"] == "lp-session" and body["runId"] == run.id
    assert [event["type"] for event in body["items"]] == ["assistant_message"]
    assert body["cursor"] == str(body["items"][0]["seq"])
