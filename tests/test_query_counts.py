"""Hot routes make a fixed number of queries, whatever the batch or page size."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs import services
from tests.conftest import make_key, make_run

pytestmark = pytest.mark.django_db


def queries_for(call) -> int:
    with CaptureQueriesContext(connection) as captured:
        status, _ = call()
    assert status in (200, 201)
    # Savepoints come from the test's wrapping transaction; deployed, the service's own transaction
    # is BEGIN/COMMIT, which psycopg sends without a query.
    return sum(1 for q in captured.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE SAVEPOINT")))


def batch(size, key):
    return {
        "runnerId": "r",
        "leaseEpoch": 1,
        "batchKey": key,
        "events": [{"type": "assistant_message", "payload": {"text": "x" * 50, "n": n}} for n in range(size)],
    }


def test_batch_append_query_count_does_not_grow_with_batch_size():
    runner = make_key("runner")
    run = make_run(session_id="q1")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    counts = {size: queries_for(lambda s=size: runner.post(f"runs/{run.id}/events", batch(s, f"b{s}")))
              for size in (1, 50, 500)}
    assert len(set(counts.values())) == 1, counts
    # auth, lock run, batch-key lookup, insert events, insert batch, run seq, session touch, notify
    assert counts[1] <= 8, counts


def test_single_event_append_query_count():
    runner = make_key("runner")
    run = make_run(session_id="q2")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    body = {"runnerId": "r", "leaseEpoch": 1, "type": "usage", "payload": {"inputTokens": 1}}
    assert queries_for(lambda: runner.post(f"runs/{run.id}/events", body)) <= 6


def test_event_page_query_count_does_not_grow_with_page_size():
    client, runner = make_key("client"), make_key("runner")
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    runner.post(f"runs/{run.id}/events", batch(400, "fill"))
    small = queries_for(lambda: client.get(f"runs/{run.id}/events", limit="5"))
    large = queries_for(lambda: client.get(f"runs/{run.id}/events", limit="500"))
    assert small == large <= 3


def test_command_page_query_count_is_fixed():
    client = make_key("client")
    run = make_run()
    for n in range(30):
        services.command_create(run_id=run.id, command_type="turn", payload={"prompt": str(n)})
    assert queries_for(lambda: client.get(f"runs/{run.id}/commands", limit="2")) == queries_for(
        lambda: client.get(f"runs/{run.id}/commands", limit="100")
    )
