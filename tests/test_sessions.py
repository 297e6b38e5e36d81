"""Sessions: upsert, attention, the inbox and its walk, the change feed, storage (services and selectors)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction

from agentrun import counters
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import AgentRunError
from runs import services as run_services
from sessions import selectors, services
from sessions.models import Session, SessionReadCursor
from tests.helpers import PROJECT, TENANT, claim, make_run

pytestmark = pytest.mark.django_db
SCOPE = Scope(tenant_id=TENANT, project_id=PROJECT)


def put(session_id, **fields):
    fields.setdefault("tenant_id", TENANT)
    fields.setdefault("project_id", PROJECT)
    fields.setdefault("backend_profile", "echo")
    return services.session_upsert(session_id=session_id, **fields)


def listing(**kwargs):
    kwargs.setdefault("scope", SCOPE)
    return selectors.session_list(**kwargs)


def ids(page):
    return [s.session_id for s in page.sessions]


def start_turn(session_id, prompt="do it"):
    run = make_run(session_id=session_id)
    command, _ = run_services.command_create(run_id=run.id, command_type="turn", payload={"prompt": prompt})
    return run, command


def finish_turn(run, command, runner="runner-1"):
    claimed = claim(run, runner_id=runner)
    return run_services.command_finish(
        command_id=command.id, runner_id=runner, lease_epoch=claimed.lease_epoch, terminal_status="completed"
    )


# --- upsert ----------------------------------------------------------------------------------


def test_upsert_creates_an_idle_session_with_the_next_global_version():
    make_run(session_id="from-run")
    # The run's last stamp: its creation's version, or the touch of its first event after it.
    before = Session.objects.get(pk="from-run").inbox_version
    session, created = put("s1", metadata={"title": "  Fix the build  "}, conversation_id="conv")
    assert created
    assert session.version == before + 1  # one counter for every bump (A1), not 1
    assert session.execution_state == "idle" and session.storage_kind == "none"
    assert session.title == "Fix the build"  # every creation path derives the title (A9)
    assert session.last_run_id is None and session.active_run_id is None and session.last_event_seq == 0
    assert session.summary == {} and session.conversation_id == "conv"
    assert session.last_activity_at == session.created_at == session.updated_at


def test_upsert_overwrites_the_descriptive_fields_and_keeps_the_rest():
    _run, command = start_turn("s1", prompt="first prompt")
    services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="pvc-1")
    before = Session.objects.get(pk="s1")
    session, created = put("s1", thread_id="t-9", metadata={"k": "v"})
    assert not created
    assert session.version > before.version
    assert session.thread_id == "t-9" and session.metadata == {"k": "v"}
    assert session.conversation_id is None and session.expires_at is None  # absent ones become null
    stored = Session.objects.get(pk="s1")
    assert stored.execution_state == "running" and stored.active_command_id == command.id
    assert stored.title == "first prompt"  # no metadata title: the title stays
    assert stored.storage_kind == "pvc" and stored.storage_pvc_name == "pvc-1"
    assert stored.last_activity_at == before.last_activity_at
    put("s1", metadata={"title": "Renamed"})
    assert Session.objects.get(pk="s1").title == "Renamed"


@pytest.mark.parametrize(
    ("fields", "status", "kind"),
    [
        ({"tenant_id": "other"}, 403, "tenant-policy-denied"),
        ({"project_id": "other"}, 403, "tenant-policy-denied"),
        ({"backend_profile": "codex"}, 400, "schema-invalid"),
        ({"tenant_id": "other", "backend_profile": "codex"}, 403, "tenant-policy-denied"),
    ],
)
def test_upsert_keeps_the_session_boundary(fields, status, kind):
    put("s1", metadata={"a": 1})
    before = Session.objects.get(pk="s1")
    with pytest.raises(AgentRunError) as error:
        put("s1", **fields)
    assert (error.value.status, error.value.kind) == (status, kind)
    assert error.value.details["valuesPrinted"] is False
    after = Session.objects.get(pk="s1")
    assert (after.version, after.metadata, after.tenant_id) == (before.version, {"a": 1}, TENANT)


# --- run effects the inbox depends on ----------------------------------------------------------


def test_a_late_finish_of_an_old_turn_leaves_the_newer_turn_running():
    run, first = start_turn("s1")
    second, _ = run_services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "again"})
    finish_turn(run, first)
    session = Session.objects.get(pk="s1")
    assert session.execution_state == "running" and session.active_command_id == second.id  # A5


def test_thread_update_keeps_storage_and_bumps_version():
    run, command = start_turn("s1")
    services.session_storage_refresh(
        session_id="s1", storage_kind="pvc", pvc_name="pvc-1", namespace="ns", codex_rollout_subdir="rollouts"
    )
    before = Session.objects.get(pk="s1").version
    claimed = claim(run)
    run_services.command_finish(
        command_id=command.id,
        runner_id="runner-1",
        lease_epoch=claimed.lease_epoch,
        terminal_status="completed",
        thread_id="thread-1",
        turn_id="turn-1",
    )
    session = Session.objects.get(pk="s1")
    assert session.thread_id == "thread-1" and session.metadata["lastTurnId"] == "turn-1"
    assert (session.storage_kind, session.storage_pvc_name, session.storage_namespace) == ("pvc", "pvc-1", "ns")
    assert session.codex_rollout_subdir == "rollouts"  # A4: storage survives the thread update
    assert session.version > before and session.execution_state == "terminal"


# --- attention and read cursors ----------------------------------------------------------------


def summary_of(session_id, reader=None):
    return selectors.session_with_cursor(session_id=session_id, reader_id=reader, scope=SCOPE)


def attention(session_id, reader=None):
    from sessions.serializers import SessionOut

    record = SessionOut(reader_id=reader).to_representation(summary_of(session_id, reader))
    return record["attentionState"], record["active"], record["unread"]


def test_mark_read_stores_the_current_version_and_changes_nothing_else():
    put("s1")
    version = Session.objects.get(pk="s1").version
    cursor = services.session_mark_read(session_id="s1", reader_id="ana", scope=SCOPE)
    assert (cursor.session_id, cursor.reader_id, cursor.session_version) == ("s1", "ana", version)
    assert Session.objects.get(pk="s1").version == version
    assert attention("s1", "ana") == ("read", False, False)
    assert attention("s1", "bob") == ("unread", False, True)
    assert attention("s1") == ("unread", False, True)  # no reader: every inactive session is unread
    put("s1", metadata={"x": 1})
    assert attention("s1", "ana") == ("unread", False, True)
    again = services.session_mark_read(session_id="s1", reader_id="ana", scope=SCOPE)
    assert again.session_version == Session.objects.get(pk="s1").version and again.read_at >= cursor.read_at
    assert SessionReadCursor.objects.filter(session_id="s1").count() == 1


def test_mark_read_of_a_session_out_of_scope_is_not_found():
    put("s1", tenant_id="other")
    with pytest.raises(AgentRunError) as error:
        services.session_mark_read(session_id="s1", reader_id="ana", scope=SCOPE)
    assert error.value.status == 404
    with pytest.raises(AgentRunError):
        services.session_mark_read(session_id="s1", reader_id="ana", scope=Scope(tenant_id="other", project_id="p2"))


def test_mark_read_is_a_transaction_of_its_own():
    put("s1")
    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        services.session_mark_read(session_id="s1", reader_id="ana", scope=SCOPE)
    assert not SessionReadCursor.objects.filter(session_id="s1").exists()


@pytest.mark.parametrize(
    ("step", "arguments"),
    [
        (services.session_touch_claimed, {"run_id": "r1"}),
        (
            services.session_touch_command_created,
            {"run_id": "r1", "command_id": "c1", "command_type": "turn", "payload": {}},
        ),
        (
            services.session_touch_turn_ended,
            {"run_id": "r1", "command_id": "c1", "terminal_status": "completed", "failure_kind": None},
        ),
        (services.session_touch_run_ended, {"run_id": "r1", "terminal_status": "completed", "failure_kind": None}),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_the_steps_of_runs_transactions_refuse_to_run_outside_one(step, arguments):
    put("s1")
    version = Session.objects.get(pk="s1").version
    with pytest.raises(RuntimeError, match="inside its caller's transaction"):
        step(session_id="s1", at=db_now(), **arguments)
    with transaction.atomic():
        step(session_id="s1", at=db_now(), **arguments)
    assert Session.objects.get(pk="s1").version >= version


def test_resolving_or_updating_a_runs_session_outside_a_transaction_is_refused():
    ref = {"sessionId": "s1"}
    common = {"tenant_id": TENANT, "project_id": PROJECT, "backend_profile": "echo", "run_id": "r1"}
    with pytest.raises(RuntimeError):
        services.session_resolve_for_run(session_ref=ref, now=db_now(), **common)
    with pytest.raises(RuntimeError):
        services.session_thread_update(run_session_ref=ref, thread_id="t", turn_id=None, at=db_now(), **common)
    assert not Session.objects.filter(pk="s1").exists()


def test_a_running_session_is_active_whatever_was_read():
    run, command = start_turn("s1")
    services.session_mark_read(session_id="s1", reader_id="ana", scope=SCOPE)
    assert attention("s1", "ana") == ("active", True, False)
    finish_turn(run, command)
    assert attention("s1", "ana") == ("unread", False, True)  # the turn's end bumped the version


# --- the inbox -----------------------------------------------------------------------------------


def make_inbox():
    """running (active), unread terminal, read terminal, unread idle, read idle; with times set."""
    _run, _ = start_turn("running")
    for name in ("done-unread", "done-read"):
        r, c = start_turn(name)
        finish_turn(r, c)
    put("idle-unread")
    put("idle-read")
    for name in ("done-read", "idle-read"):
        services.session_mark_read(session_id=name, reader_id="ana", scope=SCOPE)
    put("codex-idle", backend_profile="codex")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("default", {"running", "done-unread", "idle-unread", "codex-idle"}),
        ("running", {"running"}),
        ("unread", {"done-unread", "idle-unread", "codex-idle"}),
        ("terminal", {"done-unread", "done-read"}),
        ("idle", {"idle-unread", "idle-read", "codex-idle"}),
        ("all", {"running", "done-unread", "done-read", "idle-unread", "idle-read", "codex-idle"}),
    ],
)
def test_list_states_filter_by_attention(state, expected):
    make_inbox()
    assert set(ids(listing(state=state, reader_id="ana"))) == expected


def test_list_filters_by_backend_and_rejects_unknown_states():
    make_inbox()
    assert ids(listing(state="all", backend_profile="codex")) == ["codex-idle"]
    with pytest.raises(AgentRunError) as error:
        listing(state="sleeping")
    assert (error.value.status, error.value.kind) == (400, "schema-invalid")


def test_without_a_reader_every_inactive_session_is_unread():
    make_inbox()
    assert set(ids(listing())) == {"running", "done-unread", "done-read", "idle-unread", "idle-read", "codex-idle"}


def test_inbox_sorts_active_then_unread_then_newest_activity_then_id():
    make_inbox()
    at = db_now()
    # Same activity for the unread ones, then ties broken by update time and id.
    Session.objects.filter(pk__in=["done-unread", "idle-unread"]).update(last_activity_at=at, updated_at=at)
    Session.objects.filter(pk="codex-idle").update(last_activity_at=None, updated_at=at + timedelta(seconds=5))
    Session.objects.filter(pk="done-read").update(last_activity_at=at - timedelta(days=1))
    Session.objects.filter(pk="idle-read").update(last_activity_at=at - timedelta(days=2))
    assert ids(listing(state="all", reader_id="ana")) == [
        "running",
        "codex-idle",
        "done-unread",
        "idle-unread",
        "done-read",
        "idle-read",
    ]


def test_sorted_list_returns_the_highest_matching_version_as_cursor():
    make_inbox()
    page = listing(state="terminal", reader_id="ana")
    expected = max(Session.objects.filter(execution_state="terminal").values_list("version", flat=True))
    assert page.cursor == str(expected)
    assert listing(state="running", backend_profile="codex").cursor is None


def test_lists_are_scoped_to_the_key_tenant_and_project():
    put("mine")
    put("other-project", project_id="p2")
    put("other-tenant", tenant_id="t2")
    assert ids(listing(state="all")) == ["mine"]
    assert set(ids(listing(state="all", scope=Scope(tenant_id=TENANT)))) == {"mine", "other-project"}
    assert ids(listing(state="all", cursor=0)) == ["mine"]


# --- the change feed -------------------------------------------------------------------------------


def test_feed_lists_changes_after_the_cursor_in_version_order():
    for name in ("a", "b", "c"):
        put(name)
    put("a", metadata={"again": True})
    versions = dict(Session.objects.values_list("session_id", "version"))
    page = listing(state="all", cursor=versions["b"] - 1, limit=2)
    assert ids(page) == ["b", "c"] and page.cursor == str(versions["c"])
    page = listing(state="all", cursor=int(page.cursor))
    assert ids(page) == ["a"] and page.cursor == str(versions["a"])
    empty = listing(state="all", cursor=int(page.cursor))
    assert ids(empty) == [] and empty.cursor == page.cursor  # an empty page echoes the cursor
    assert empty.next_page_token is None


def test_cursor_and_page_token_together_are_refused():
    put("a")
    with pytest.raises(AgentRunError) as error:
        listing(cursor=1, page_token="x")
    assert error.value.status == 400


# --- the walk (pageToken) ----------------------------------------------------------------------------


def walk(limit, between=None, **kwargs):
    """Every page of the inbox; `between(page_number)` changes rows between pages."""
    seen, token, page_number = [], None, 0
    while True:
        page = listing(limit=limit, page_token=token, **kwargs)
        seen.extend(ids(page))
        token = page.next_page_token
        page_number += 1
        if token is None:
            return seen
        assert len(page.sessions) == limit
        if between:
            between(page_number)


def make_many(count):
    at = db_now()
    for index in range(count):
        put(f"s{index:02d}")
        # Distinct activity, newest first: s00 is the newest.
        Session.objects.filter(pk=f"s{index:02d}").update(
            last_activity_at=at - timedelta(minutes=index), updated_at=at - timedelta(hours=1)
        )


def test_walk_without_changes_returns_each_session_once_in_inbox_order():
    make_many(23)
    assert walk(5, state="all") == [f"s{i:02d}" for i in range(23)]


def test_walk_neither_skips_nor_repeats_unchanged_sessions_while_others_change():
    make_many(20)
    moved_up, moved_down = "s15", "s01"

    def change(page_number):
        if page_number == 1:
            # s15 (not yet shown) gets new activity and jumps to the top: a keyset on the live
            # order would skip it. s01 (shown) is read and drops to the read group: a keyset on
            # the live order would show it again.
            run_services_touch(moved_up)
            services.session_mark_read(session_id=moved_down, reader_id="ana", scope=SCOPE)
            put("brand-new")
            Session.objects.filter(pk="s19").delete()

    seen = walk(4, between=change, state="all", reader_id="ana")
    unchanged = [f"s{i:02d}" for i in range(19) if f"s{i:02d}" not in (moved_up, moved_down)]
    for name in unchanged:
        assert seen.count(name) == 1, (name, seen)
    assert seen.count(moved_up) == 1  # not skipped: it comes in the walk's tail
    assert seen.count(moved_down) == 2  # shown, then shown again after it changed (read)
    assert "brand-new" in seen and "s19" not in seen
    assert [name for name in seen if name in unchanged] == unchanged  # the snapshot keeps its order


def run_services_touch(session_id):
    """New activity without a version bump: the statement an event append sends for its session."""
    sql, params = services.session_event_touch_sql(session_id=session_id, last_event_seq=1, at=db_now())
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_walk_token_belongs_to_its_listing():
    make_many(6)
    page = listing(limit=2, state="all")
    with pytest.raises(AgentRunError) as error:
        listing(limit=2, state="unread", page_token=page.next_page_token)
    assert error.value.status == 400
    for junk in ("junk", "eyJ9", page.next_page_token[:-3]):
        with pytest.raises(AgentRunError):
            listing(limit=2, state="all", page_token=junk)


# --- storage -----------------------------------------------------------------------------------------


def test_refresh_storage_replaces_every_storage_field_and_bumps_version():
    put("s1", codex_rollout_subdir=None)
    before = Session.objects.get(pk="s1").version
    session = services.session_storage_refresh(
        session_id="s1",
        storage_kind="pvc",
        pvc_name="pvc-1",
        namespace="ns",
        pvc_phase="Bound",
        size_bytes=1024,
        files_count=3,
        sha256="ab" * 32,
    )
    assert session.version > before and session.codex_rollout_subdir == "sessions"
    assert (session.storage_pvc_name, session.storage_namespace, session.storage_pvc_phase) == ("pvc-1", "ns", "Bound")
    assert (session.storage_size_bytes, session.storage_files_count, session.storage_sha256) == (1024, 3, "ab" * 32)
    assert session.storage_updated_at == session.updated_at
    again = services.session_storage_refresh(
        session_id="s1", storage_kind="pvc", pvc_name="pvc-1", codex_rollout_subdir="custom"
    )
    assert again.storage_namespace is None and again.storage_size_bytes is None  # absent ones become null
    assert again.codex_rollout_subdir == "custom"
    kept = services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="pvc-1")
    assert kept.codex_rollout_subdir == "custom"


def test_refresh_after_eviction_clears_the_eviction_time():
    put("s1")
    services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="pvc-1")
    evicted = services.session_storage_evict(session_id="s1", pvc_name="pvc-1")
    assert evicted.storage_kind == "evicted" and evicted.storage_evicted_at is not None
    session = services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="pvc-2")
    assert session.storage_evicted_at is None  # A15


def test_refresh_storage_rejects_unknown_kinds():
    put("s1")
    with pytest.raises(AgentRunError) as error:
        services.session_storage_refresh(session_id="s1", storage_kind="s3")
    assert error.value.status == 400


def test_evict_only_the_current_pvc():
    put("s1")
    services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="pvc-2")
    before = Session.objects.get(pk="s1")
    with pytest.raises(AgentRunError) as error:
        services.session_storage_evict(session_id="s1", pvc_name="pvc-1")
    assert (error.value.status, error.value.kind) == (409, "schema-invalid")
    after = Session.objects.get(pk="s1")
    assert (after.version, after.storage_kind) == (before.version, "pvc")
    evicted = services.session_storage_evict(session_id="s1", pvc_name="pvc-2")
    assert evicted.version > before.version and evicted.storage_pvc_name == "pvc-2"
    assert evicted.storage_evicted_at == evicted.storage_updated_at == evicted.updated_at
    again = services.session_storage_evict(session_id="s1", pvc_name="pvc-2")
    assert again.version == evicted.version  # evicting again changes nothing


def test_a_run_scoped_key_reaches_only_its_run_session():
    first = make_run(session_id="s1")
    make_run(session_id="s2")
    scope = Scope(tenant_id=TENANT, project_id=PROJECT, run_id=first.id)
    services.session_storage_refresh(session_id="s1", storage_kind="pvc", pvc_name="p", scope=scope)
    with pytest.raises(AgentRunError) as error:
        services.session_storage_refresh(session_id="s2", storage_kind="pvc", pvc_name="p", scope=scope)
    assert error.value.status == 404


def test_gc_candidates_are_expired_pvc_sessions_oldest_first():
    now = db_now()
    specs = {
        "old": ("pvc", "pvc-old", now - timedelta(days=1), now - timedelta(hours=3)),
        "boundary": ("pvc", "pvc-b", now, now - timedelta(hours=2)),
        "newer": ("pvc", "pvc-n", now - timedelta(days=1), now - timedelta(hours=1)),
        "live": ("pvc", "pvc-live", now + timedelta(days=1), now - timedelta(hours=4)),
        "no-expiry": ("pvc", "pvc-x", None, now - timedelta(hours=4)),
        "no-name": ("pvc", "", now - timedelta(days=1), now - timedelta(hours=4)),
        "evicted": ("evicted", "pvc-e", now - timedelta(days=1), now - timedelta(hours=4)),
        "none": ("none", None, now - timedelta(days=1), now - timedelta(hours=4)),
    }
    for name, (kind, pvc, expires, updated) in specs.items():
        put(name)
        Session.objects.filter(pk=name).update(
            storage_kind=kind, storage_pvc_name=pvc, expires_at=expires, updated_at=updated
        )
    assert [s.session_id for s in selectors.gc_candidates(now=now, limit=10)] == ["old", "boundary", "newer"]
    assert [s.session_id for s in selectors.gc_candidates(now=now, limit=1)] == ["old"]


def test_versions_all_come_from_the_one_counter():
    put("a")
    services.session_storage_refresh(session_id="a", storage_kind="pvc", pvc_name="p")
    services.session_storage_evict(session_id="a", pvc_name="p")
    version = Session.objects.get(pk="a").version
    assert counters.next_version(counters.SESSIONS) == version + 1
