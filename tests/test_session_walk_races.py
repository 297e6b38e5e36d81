"""The inbox walk stays exact while writers race it on their own connections.

Writers change sessions while a reader walks the inbox, its first page included: event touches
that dawdle before they commit (holding the counter, so commits queue behind them), new runs,
PUTs, claims, the walking reader's reads and another reader's, new sessions. Each page is its
own REPEATABLE READ snapshot, as deployed. The writers stop after a few pages, so every change
committed before the walk's last pages. Whatever the timing:

- the rows stamped at or below the walk's edge come first (the snapshot part), once each, in
  inbox order; every session whose last stamp is still at or below the edge is among them;
- after them come only rows stamped above the edge, in stamp order, and every session changed
  after the edge that the filter still takes is there with its last stamp.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction

from agentrun.auth import Scope
from agentrun.clock import db_now
from sessions import selectors, services
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, Threads, claim, make_run

pytestmark = pytest.mark.django_db(transaction=True)
SCOPE = Scope(tenant_id=TENANT, project_id=PROJECT)
SESSIONS, WRITERS, WRITES, LIMIT, WRITING_PAGES = 45, 4, 12, 3, 6
READER = "ana"


def put(session_id: str, **fields):
    return services.session_upsert(
        session_id=session_id, tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", **fields
    )


def make_inbox(rng: random.Random) -> None:
    for index in range(SESSIONS):
        put(f"s{index:02d}")
    for index in range(0, SESSIONS, 3):
        claim(make_run(session_id=f"s{index:02d}"))
    for index in rng.sample(range(SESSIONS), SESSIONS // 2):
        services.session_mark_read(session_id=f"s{index:02d}", reader_id=READER, scope=SCOPE)
    at = db_now()
    for index in range(SESSIONS):  # a few activity values, so ties are broken by update time and id
        Session.objects.filter(pk=f"s{index:02d}").update(
            last_activity_at=at - timedelta(minutes=rng.randrange(4)), updated_at=at - timedelta(hours=index % 3)
        )


def slow_touch(session_id: str, rng: random.Random) -> None:
    """An event append's session touch that waits before it commits, holding the counter."""
    with transaction.atomic():
        sql, params = services.session_event_touch_sql(session_id=session_id, last_event_seq=1, at=db_now())
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
        time.sleep(rng.uniform(0, 0.01))  # holding the counter before commit is the race under test


def write(writer: int, serial: int, rng: random.Random) -> None:
    session_id = f"s{rng.randrange(SESSIONS):02d}"
    action = rng.choice(("touch", "touch", "run", "put", "claim", "read", "read-other", "new"))
    if action == "touch":
        slow_touch(session_id, rng)
    elif action == "run":
        make_run(session_id=session_id)
    elif action == "put":
        put(session_id, metadata={"writer": writer, "serial": serial})
    elif action == "claim":
        with transaction.atomic():
            services.session_touch_claimed(session_id=session_id, run_id=f"run-{writer}-{serial}", at=db_now())
    elif action in ("read", "read-other"):
        reader = READER if action == "read" else "bob"
        services.session_mark_read(session_id=session_id, reader_id=reader, scope=SCOPE)
    else:
        put(f"new-{writer}-{serial}")


def edge_of(token: str) -> int:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["e"]


def stamp(session: Session) -> int:
    return max(session.inbox_version, session.cursor_read_version or 0)


def inbox_key(session: Session) -> tuple:
    if session.active:
        group = 0
    elif session.cursor_version is None or session.cursor_version < session.version:
        group = 1
    else:
        group = 2
    activity = session.last_activity_at or session.updated_at
    return group, -activity.timestamp(), -session.updated_at.timestamp(), session.session_id


def walk_while_writing(state: str, seed: int) -> tuple[list[Session], int]:
    """The walk's rows and its edge; writers run from before its first page to page WRITING_PAGES."""
    stop, started = threading.Event(), threading.Barrier(WRITERS + 1)
    rows, token, edge, pages = [], None, None, 0

    def writer(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        started.wait()
        for serial in range(WRITES):
            if stop.is_set():
                return
            write(index, serial, rng)

    writers = Threads(WRITERS, writer)
    try:
        started.wait()
        while True:
            page = selectors.session_list(scope=SCOPE, state=state, reader_id=READER, limit=LIMIT, page_token=token)
            rows.extend(page.sessions)
            token, pages = page.next_page_token, pages + 1
            if token is None:
                break
            edge = edge if edge is not None else edge_of(token)
            if pages == WRITING_PAGES:
                stop.set()
                writers.join()  # every change commits before the walk's next page
    finally:
        stop.set()
        writers.join()
    assert pages > WRITING_PAGES, "the walk ended while the writers were still writing"
    return rows, edge


@pytest.mark.parametrize(("state", "seed"), [("all", 0), ("all", 1), ("all", 2), ("default", 3), ("unread", 4)])
def test_a_walk_raced_by_writers_is_exact(state, seed):
    make_inbox(random.Random(seed))
    rows, edge = walk_while_writing(state, seed)
    final = {
        s.session_id: s
        for s in selectors.session_list(scope=SCOPE, state=state, reader_id=READER, limit=10_000).sessions
    }
    snapshot = [s for s in rows if stamp(s) <= edge]
    tail = rows[len(snapshot) :]
    assert all(stamp(s) > edge for s in tail), "the snapshot part comes first"
    ids = [s.session_id for s in snapshot]
    assert len(ids) == len(set(ids)), ids
    assert [inbox_key(s) for s in snapshot] == sorted(inbox_key(s) for s in snapshot), "inbox order"
    unchanged = {i for i, s in final.items() if stamp(s) <= edge}
    assert unchanged <= set(ids), sorted(unchanged - set(ids))
    keys = [(stamp(s), s.session_id) for s in tail]
    assert keys == sorted(set(keys)), "the tail in stamp order"
    last_seen = {s.session_id: stamp(s) for s in tail}
    changed = {i: stamp(s) for i, s in final.items() if stamp(s) > edge}
    assert {i: last_seen.get(i) for i in changed} == changed, "every change after the edge, as it is now"
    assert tail, "the writers changed nothing during the walk"


def test_an_unchanged_walk_in_its_own_snapshots_is_the_big_page():
    make_inbox(random.Random(7))
    expected = [
        s.session_id for s in selectors.session_list(scope=SCOPE, state="all", reader_id=READER, limit=10_000).sessions
    ]
    for limit in (1, 4, 7):
        walked, token = [], None
        while True:
            page = selectors.session_list(scope=SCOPE, state="all", reader_id=READER, limit=limit, page_token=token)
            walked.extend(s.session_id for s in page.sessions)
            token = page.next_page_token
            if token is None:
                break
        assert walked == expected, limit
