"""Hot routes make a fixed number of queries, whatever the batch or page size."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from runs import services
from tests.conftest import PROJECT, TENANT, make_key, make_run

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
    counts = {
        size: queries_for(lambda s=size: runner.post(f"runs/{run.id}/events", batch(s, f"b{s}")))
        for size in (1, 50, 500)
    }
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


def make_sessions(first: int, last: int) -> None:
    from datetime import timedelta

    from django.db.models.functions import Now

    from agentrun.auth import Scope
    from sessions import services as session_services
    from sessions.models import Session, SessionReadCursor

    for index in range(first, last):
        session_services.session_upsert(
            session_id=f"inbox-{index}", tenant_id=TENANT, project_id=PROJECT, backend_profile="echo"
        )
        if index % 3 == 0:
            session_services.session_mark_read(session_id=f"inbox-{index}", reader_id="ana", scope=Scope.unrestricted())
    # Older than any walk's snapshot: later pages come from the sorted scan, not the tail.
    Session.objects.filter(session_id__startswith="inbox-").update(
        updated_at=Now() - timedelta(hours=1), last_activity_at=Now() - timedelta(hours=1)
    )
    SessionReadCursor.objects.filter(reader_id="ana").update(read_at=Now() - timedelta(hours=1))


def inbox_queries(client) -> tuple[int, int]:
    """(queries for the first page, for the next one)."""
    params = {"readerId": "ana", "limit": "4", "state": "all"}
    tokens = []

    def first():
        status, body = client.get("sessions", **params)
        tokens.append(body["nextPageToken"])
        return status, body

    first_page = queries_for(first)
    return first_page, queries_for(lambda: client.get("sessions", **params, pageToken=tokens[0]))


def test_inbox_pages_make_the_same_queries_for_ten_or_a_hundred_sessions():
    client = make_key("client")
    make_sessions(0, 10)
    few = inbox_queries(client)
    make_sessions(10, 100)
    many = inbox_queries(client)
    assert few == many, (few, many)
    assert many == (3, 3), many  # auth; the clock with the watermark; the page (its groups in one statement)
