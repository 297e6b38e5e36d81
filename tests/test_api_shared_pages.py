"""Long-poll waiters woken together share one fetch only when they would render the same page:
a run's events and its session's trace ask the same question of the same run, but answer with
different records."""

from __future__ import annotations

import pytest

from agentrun import notify
from runs import services
from tests.helpers import Threads, make_key, make_run, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_count(topic):
    with notify.hub._lock:
        return len(notify.hub._waiters.get(topic, ()))


def test_a_runs_events_and_its_sessions_trace_woken_together_keep_their_own_shapes():
    client, runner = make_key("client"), make_key("runner")
    run = make_run(session_id="s-shared")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    topic = notify.run_topic(run.id)
    paths = [f"runs/{run.id}/events", "sessions/s-shared/trace"] * 3
    waiters = Threads(len(paths), lambda index: client.get(paths[index], afterSeq="2", wait="20"))
    assert wait_for(lambda: waiting_count(topic) == len(paths))
    event = {"runnerId": "r", "leaseEpoch": 1, "type": "assistant_message", "payload": {"t": 1}}
    assert runner.post(f"runs/{run.id}/events", event)[0] == 201
    answers = waiters.join(20)
    for path, (status, body) in zip(paths, answers, strict=True):
        assert status == 200 and [item["seq"] for item in body["items"]] == [3], (path, body)
        if path.startswith("runs/"):
            assert list(body) == ["items", "count", "cursor"], (path, body)
        else:
            assert list(body) == ["sessionId", "runId", "items", "count", "cursor"], (path, body)
            assert (body["sessionId"], body["runId"]) == ("s-shared", run.id)
