"""Hot routes make an exact number of queries, whatever the batch or page size: one query more
fails the test.

The tests run outside a wrapping test transaction (transactional_db), so the queries counted are
the ones a deployed server sends, the service's BEGIN and COMMIT included.
"""

from __future__ import annotations

import pytest

from runs import services
from tests.helpers import PROJECT, TENANT, make_run
from tests.helpers import make_key as helpers_make_key

pytestmark = pytest.mark.django_db(transaction=True)

# auth; BEGIN; lock the run and look up the batch key (one statement); insert the events, the
# batch, the run's seq and the session's touch (one statement); COMMIT
APPEND_QUERIES = 5
# auth; the run in scope; the page
PAGE_QUERIES = 3
# auth; BEGIN; REPEATABLE READ, READ ONLY; the clock with the watermark; the page (its groups in
# one statement); COMMIT
INBOX_QUERIES = 6


def make_key(role):
    """A key that has been used: its first request also notes its last use (one write a minute),
    which is not the route's cost."""
    api = helpers_make_key(role)
    answered(api.get("backends"))
    return api


def answered(response) -> None:
    status, body = response
    assert status in (200, 201), body


def batch(size, key):
    return {
        "runnerId": "r",
        "leaseEpoch": 1,
        "batchKey": key,
        "events": [{"type": "assistant_message", "payload": {"text": "x" * 50, "n": n}} for n in range(size)],
    }


def test_a_batch_append_makes_the_same_queries_for_1_50_or_500_events(django_assert_num_queries):
    runner = make_key("runner")
    run = make_run(session_id="q1")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    for size in (1, 50, 500):
        with django_assert_num_queries(APPEND_QUERIES, info=f"a batch of {size}"):
            answered(runner.post(f"runs/{run.id}/events", batch(size, f"b{size}")))


def test_a_single_event_append_makes_the_queries_of_a_batch(django_assert_num_queries):
    runner = make_key("runner")
    run = make_run(session_id="q2")
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    body = {"runnerId": "r", "leaseEpoch": 1, "type": "usage", "payload": {"inputTokens": 1}}
    with django_assert_num_queries(APPEND_QUERIES):
        answered(runner.post(f"runs/{run.id}/events", body))


def test_an_event_page_makes_the_same_queries_for_5_or_500_events(django_assert_num_queries):
    client, runner = make_key("client"), make_key("runner")
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    answered(runner.post(f"runs/{run.id}/events", batch(400, "fill")))
    for limit in ("5", "500"):
        with django_assert_num_queries(PAGE_QUERIES, info=f"limit {limit}"):
            answered(client.get(f"runs/{run.id}/events", limit=limit))


def test_a_command_page_makes_the_same_queries_for_2_or_30_commands(django_assert_num_queries):
    client = make_key("client")
    run = make_run()
    for n in range(30):
        services.command_create(run_id=run.id, command_type="turn", payload={"prompt": str(n)})
    for limit in ("2", "100"):
        with django_assert_num_queries(PAGE_QUERIES, info=f"limit {limit}"):
            answered(client.get(f"runs/{run.id}/commands", limit=limit))


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


def walk_two_inbox_pages(client, assert_num_queries, sessions: int) -> None:
    params = {"readerId": "ana", "limit": "4", "state": "all"}
    with assert_num_queries(INBOX_QUERIES, info=f"the first page of {sessions} sessions"):
        status, body = client.get("sessions", **params)
    assert status == 200 and body["nextPageToken"], body
    with assert_num_queries(INBOX_QUERIES, info=f"the next page of {sessions} sessions"):
        answered(client.get("sessions", **params, pageToken=body["nextPageToken"]))


def test_inbox_pages_make_the_same_queries_for_ten_or_a_hundred_sessions(django_assert_num_queries):
    client = make_key("client")
    make_sessions(0, 10)
    walk_two_inbox_pages(client, django_assert_num_queries, 10)
    make_sessions(10, 100)
    walk_two_inbox_pages(client, django_assert_num_queries, 100)
