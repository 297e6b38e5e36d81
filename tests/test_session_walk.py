"""The inbox walk (`pageToken`) is exact, as properties over random inboxes on the real database.

Each example builds its own inbox in a project of its own: sessions in every attention group
(running, unread and read terminal or idle, claimed without a turn), two readers with their own
cursors, activity and update times drawn from a few values so that every tie-break is used.
Then, for a random reader, filter and page size:

- nothing changes during the walk: its pages joined are the inbox read as one big page, the same
  items in the same order;
- random changes between pages, through the services that make them (event and claim touches, a
  new run, a turn and its end, an old turn's or run's late end, a PUT, storage, either reader's
  read, a new session): the sessions unchanged throughout come once each in the big page's
  order; that snapshot part comes before every changed session's entry (the tail), each at most
  once per change, in the order of the changes' stamps; and every changed session that the
  filter still takes comes after its last change. Another reader's read is no change at all.

A fixed walk per write path checks that each one moves a session in a way the walk sees.

The walk runs here inside the test's transaction; tests/test_session_walk_races.py walks with
writers racing it on their own connections.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from agentrun import counters
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.models import Counter as VersionCounter
from runs import services as run_services
from sessions import selectors, services
from sessions.models import Session, SessionReadCursor
from tests.helpers import TENANT, claim, make_run

pytestmark = pytest.mark.django_db
READERS = ("ana", "bob")
KINDS = ("idle", "claimed", "running", "terminal")
ACTIONS = (
    "touch",
    "claim",
    "new-run",
    "turn",
    "finish",
    "late-turn-end",
    "late-run-end",
    "put",
    "storage",
    "read",
    "read-other",
    "new",
)
EXAMPLES = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_projects = itertools.count()


@dataclass
class Planned:
    kind: str
    backend: str
    activity_minutes: int | None  # before the example's start; None: no activity
    updated_hours: int
    read_by: tuple[str, ...]
    bumped_after_read: bool


@dataclass
class Inbox:
    """An example's sessions and what the test needs to change them."""

    project: str
    scope: Scope
    backends: dict[str, str] = field(default_factory=dict)
    open_turns: dict[str, tuple] = field(default_factory=dict)  # session id -> (run, command)

    def put(self, session_id: str, **fields):
        return services.session_upsert(
            session_id=session_id,
            tenant_id=TENANT,
            project_id=self.project,
            backend_profile=self.backends[session_id],
            **fields,
        )

    def start_turn(self, session_id: str):
        run = make_run(project=self.project, backend=self.backends[session_id], session_id=session_id)
        command, _ = run_services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "go"})
        self.open_turns[session_id] = (run, command)

    def finish_turn(self, session_id: str):
        run, command = self.open_turns.pop(session_id)
        claimed = claim(run)
        run_services.command_finish(
            command_id=command.id, runner_id="runner-1", lease_epoch=claimed.lease_epoch, terminal_status="completed"
        )


planned = st.builds(
    Planned,
    kind=st.sampled_from(KINDS),
    backend=st.sampled_from(("echo", "codex")),
    activity_minutes=st.one_of(st.none(), st.integers(0, 3)),
    updated_hours=st.integers(0, 2),
    read_by=st.lists(st.sampled_from(READERS), unique=True).map(tuple),
    bumped_after_read=st.booleans(),
)
# Walks of several pages mostly: small pages, filters that keep most sessions, changes early (one
# planned after the walk's last page is never made), and often the changes that move a session
# to another attention group (a read, a turn, its end, a PUT after a read).
inboxes = st.lists(planned, max_size=12) | st.lists(planned, min_size=5, max_size=14)
walks = st.fixed_dictionaries(
    {
        "reader_id": st.sampled_from((None, *READERS, *READERS)),
        "state": st.sampled_from(selectors.STATES) | st.just("all"),
        "backend_profile": st.sampled_from((None, None, None, "echo", "codex")),
        "limit": st.integers(1, 3) | st.integers(1, 7),
    }
)
changes = st.lists(
    st.tuples(
        st.integers(1, 3) | st.integers(1, 10),
        st.sampled_from(ACTIONS) | st.sampled_from(("read", "turn", "finish", "put")),
        st.integers(0, 99),
    ),
    min_size=1,
    max_size=12,
)


def build(plans: list[Planned]) -> Inbox:
    project = f"walk-{next(_projects)}"
    inbox = Inbox(project=project, scope=Scope(tenant_id=TENANT, project_id=project))
    for index, plan in enumerate(plans):
        session_id = f"{project}-{index:02d}"
        inbox.backends[session_id] = plan.backend
        if plan.kind == "idle":
            inbox.put(session_id)
        elif plan.kind == "claimed":
            claim(make_run(project=project, backend=plan.backend, session_id=session_id))
        else:
            inbox.start_turn(session_id)
            if plan.kind == "terminal":
                inbox.finish_turn(session_id)
        for reader in plan.read_by:
            services.session_mark_read(session_id=session_id, reader_id=reader, scope=inbox.scope)
        if plan.read_by and plan.bumped_after_read:
            inbox.put(session_id, metadata={"again": True})  # a new version: unread again
    # Times from a few values, set last (before any walk): ties in activity and update time.
    start = db_now()
    for index, plan in enumerate(plans):
        activity = None if plan.activity_minutes is None else start - timedelta(minutes=plan.activity_minutes)
        Session.objects.filter(pk=f"{project}-{index:02d}").update(
            last_activity_at=activity, updated_at=start - timedelta(hours=plan.updated_hours)
        )
    return inbox


def apply(inbox: Inbox, action: str, target_index: int, serial: int, walk_reader: str | None) -> str | None:
    """Make one change; returns the session it changed for this walk, or None."""
    if action == "new" or not inbox.backends:
        session_id = f"{inbox.project}-new{serial}"
        inbox.backends[session_id] = "echo"
        inbox.put(session_id)
        return session_id
    session_id = sorted(inbox.backends)[target_index % len(inbox.backends)]
    running = session_id in inbox.open_turns
    if action == "touch":
        sql, params = services.session_event_touch_sql(session_id=session_id, last_event_seq=serial, at=db_now())
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
    elif action == "claim":  # the steps of runs' transactions, each in a transaction of its own here
        with transaction.atomic():
            services.session_touch_claimed(session_id=session_id, run_id=f"run-{serial}", at=db_now())
    elif action == "late-turn-end":  # an old turn ends late: activity only (A5)
        with transaction.atomic():
            services.session_touch_turn_ended(
                session_id=session_id,
                run_id="old-run",
                command_id="old-turn",
                terminal_status="completed",
                failure_kind=None,
                at=db_now(),
            )
    elif action == "late-run-end":  # likewise an old run
        with transaction.atomic():
            services.session_touch_run_ended(
                session_id=session_id, run_id="old-run", terminal_status="completed", failure_kind=None, at=db_now()
            )
    elif action == "new-run":
        make_run(project=inbox.project, backend=inbox.backends[session_id], session_id=session_id)
    elif action == "turn" and not running:
        inbox.start_turn(session_id)
    elif action == "finish" and running:
        inbox.finish_turn(session_id)
    elif action in ("put", "turn", "finish"):
        inbox.put(session_id, metadata={"serial": serial})
    elif action == "storage":
        services.session_storage_refresh(session_id=session_id, storage_kind="pvc", pvc_name=f"pvc-{serial}")
    else:  # a read: it changes this walk only when it is the walking reader's
        reader = walk_reader if action == "read" and walk_reader else "bob" if walk_reader == "ana" else "ana"
        services.session_mark_read(session_id=session_id, reader_id=reader, scope=inbox.scope)
        return session_id if reader == walk_reader else None
    return session_id


def big_page(inbox: Inbox, walk: dict) -> list[Session]:
    return selectors.session_list(scope=inbox.scope, **{**walk, "limit": 10_000}).sessions


def walk_pages(inbox: Inbox, walk: dict, between=None) -> list[list[Session]]:
    """Every page of the walk; `between(number)` runs after page `number` when another follows."""
    pages, token = [], None
    while True:
        page = selectors.session_list(scope=inbox.scope, page_token=token, **walk)
        pages.append(page.sessions)
        token = page.next_page_token
        if token is None:
            return pages
        assert len(page.sessions) == walk["limit"], "only the last page may be short"
        assert len(pages) < 1_000, "the walk does not end"
        if between is not None:
            between(len(pages))


def stamp(session: Session) -> int:
    """The stamp of the session's last change for the walking reader (see sessions.selectors)."""
    return max(session.inbox_version, session.cursor_read_version or 0)


def final_stamps(inbox: Inbox, reader: str | None) -> dict[str, int]:
    stamps = dict(Session.objects.filter(project_id=inbox.project).values_list("session_id", "inbox_version"))
    for session_id, read_version in SessionReadCursor.objects.filter(
        session__project_id=inbox.project, reader_id=reader
    ).values_list("session_id", "read_version"):
        stamps[session_id] = max(stamps[session_id], read_version)
    return stamps


def record(session: Session) -> tuple:
    return session.session_id, session.version, session.inbox_version, session.cursor_version


def walk_with_changes(inbox: Inbox, walk: dict, planned_changes) -> int:
    """Walk while making `planned_changes` ((after page, action, target) each), check it, and
    return how many changes were made during the walk."""
    before = [s.session_id for s in big_page(inbox, walk)]
    edge = VersionCounter.objects.get(name=counters.SESSIONS).value  # nothing writes before the first page
    changed: dict[str, list[int]] = {}  # session id -> the pages after which it changed
    serials = itertools.count()

    def between(number):
        for after_page, action, target_index in planned_changes:
            if after_page == number:
                session_id = apply(inbox, action, target_index, next(serials), walk["reader_id"])
                if session_id is not None:
                    changed.setdefault(session_id, []).append(number)

    pages = walk_pages(inbox, walk, between)
    check_walk(
        before,
        pages,
        changed,
        edge=edge,
        after={s.session_id for s in big_page(inbox, walk)},
        stamps=final_stamps(inbox, walk["reader_id"]),
    )
    return sum(len(numbers) for numbers in changed.values())


def check_walk(
    before: list[str],
    pages: list[list[Session]],
    changed: dict[str, list[int]],
    *,
    edge: int,
    after: set[str],
    stamps: dict[str, int],
) -> None:
    """`before` and `after`: the big page before and after the walk; `changed`: the pages after
    which each session changed; `edge`: the counter when the walk began; `stamps`: each
    session's last stamp for the walking reader."""
    shown = [(number, s) for number, page in enumerate(pages, 1) for s in page]

    def before_its_change(number, session_id):
        return session_id not in changed or number <= changed[session_id][0]

    snapshot = [s.session_id for number, s in shown if before_its_change(number, s.session_id)]
    tail = [(number, s) for number, s in shown if not before_its_change(number, s.session_id)]
    # The snapshot part: the big page's sessions in its order, once each, every unchanged one.
    assert len(snapshot) == len(set(snapshot)), snapshot
    assert snapshot == [session_id for session_id in before if session_id in set(snapshot)]
    assert [i for i in snapshot if i not in changed] == [i for i in before if i not in changed]
    # Unchanged rows are stamped at or below the edge, changed ones above it.
    assert all((stamp(s) <= edge) == before_its_change(number, s.session_id) for number, s in shown)
    # Then the tail: changed sessions only, at most once a change, in the order of their stamps.
    parts = [before_its_change(number, s.session_id) for number, s in shown]
    assert parts == sorted(parts, reverse=True), ("the tail comes after the snapshot", [s.session_id for _, s in shown])
    assert all(s.session_id in changed for _, s in tail), [s.session_id for _, s in tail]
    for session_id, count in Counter(s.session_id for _, s in tail).items():
        assert count <= len(changed[session_id]), session_id
    keys = [(stamp(s), s.session_id) for _, s in tail]
    assert keys == sorted(set(keys)), keys
    # Nothing is lost: a changed session the filter still takes comes after its last change, as it is now.
    for session_id, numbers in changed.items():
        if session_id in after:
            latest = [s for number, s in tail if s.session_id == session_id and number > numbers[-1]]
            assert latest and stamp(latest[-1]) == stamps[session_id], (session_id, numbers)
    if not changed:
        assert [s.session_id for _, s in shown] == before


@EXAMPLES
@given(plans=inboxes, walk=walks)
def test_without_changes_the_pages_joined_are_the_big_page(plans, walk):
    inbox = build(plans)
    expected = [record(s) for s in big_page(inbox, walk)]
    assert [record(s) for page in walk_pages(inbox, walk) for s in page] == expected


@EXAMPLES
@given(plans=inboxes, walk=walks, planned_changes=changes)
def test_changes_during_the_walk_come_after_the_snapshot_and_nothing_is_lost(plans, walk, planned_changes):
    made = walk_with_changes(build(plans), walk, planned_changes)
    target(float(made), label="changes made during the walk")  # steer towards walks with many


@pytest.mark.parametrize(
    "actions",
    [
        ("touch",),
        ("claim",),
        ("new-run",),
        ("late-turn-end",),
        ("late-run-end",),
        ("put",),
        ("storage",),
        ("read",),
        ("read-other",),
        ("new",),
        ("turn", "finish"),
    ],
)
def test_every_write_that_moves_a_session_is_seen_by_the_walk(actions):
    """Six idle sessions, newest first; ana has read the even ones, so her inbox is s01 s03 s05
    (unread), then s00 s02 s04 (read). After each page (two a page) the next action changes
    s03 (shown), s04 and s05 (not yet shown): each moves across the walk's position, forwards or
    back, so a write the walk could not see would show a session twice, out of place, or never."""
    plans = [
        Planned(
            kind="idle",
            backend="echo",
            activity_minutes=index,
            updated_hours=0,
            read_by=("ana",) if index % 2 == 0 else (),
            bumped_after_read=False,
        )
        for index in range(6)
    ]
    walk = {"reader_id": "ana", "state": "all", "backend_profile": None, "limit": 2}
    made = walk_with_changes(
        build(plans), walk, [(page, action, index) for page, action in enumerate(actions, 1) for index in (3, 4, 5)]
    )
    assert made == (0 if actions == ("read-other",) else 3 * len(actions))
