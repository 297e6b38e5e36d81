"""Reads of sessions: one session's summary, the inbox, the change feed, GC candidates.

The inbox (no cursor) is sorted as SPEC §4.4 says: active first, then unread, then newest
activity, then update time, then id. Attention splits it into three groups (active, unread,
read); each group is one index-ordered scan, so a page of 50 reads about 50 rows however large
the tenant. Paging goes on with an opaque `pageToken`, a keyset position plus the walk's edge:

- The walk is the inbox as it stood when its first page was read. Its edge is the session
  counter's value in that page's snapshot. Every write that can move a session in a reader's
  inbox takes a counter value in its own transaction and stamps it on the row: a version bump,
  an activity touch (`activity_version`), the reader's read (the cursor's `read_version`). The
  counter's row lock is held until commit, so every value at or below the edge was committed
  before the first page's snapshot and every later commit has a value above it. A session whose
  stamps are all at or below the edge is therefore exactly one that has not changed since the
  walk began: later pages take only those, after the keyset position, so the pages joined are
  the first page's inbox, in its order, item for item, as one big page would have shown it.
- The sessions changed after the edge come after the snapshot, in the order their changes
  committed (the walk's tail, keyed by the last stamp), and again each time they change while
  the tail is read. So a walk never skips a session, and shows one twice only to show it
  changed after it was shown. A read by the walking reader is such a change: the session leaves
  the unread group for the tail (where a filter without read sessions drops it).

With a `cursor` (or `updatedAfter`) the list is a change feed instead (SPEC §7 A2): sessions
whose version is above the cursor, in version order. Versions come from one counter whose
order is commit order, so a follower of the feed sees every committed change.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction

from agentrun import counters
from agentrun.auth import Scope
from agentrun.errors import invalid, not_found
from agentrun.text import is_unstorable
from sessions.models import ExecutionState, Session, StorageKind

STATES = ("default", "running", "unread", "terminal", "idle", "all")
ACTIVE, UNREAD, READ = 0, 1, 2
GROUPS = {
    "default": (ACTIVE, UNREAD),
    "running": (ACTIVE,),
    "unread": (UNREAD,),
    "terminal": (UNREAD, READ),
    "idle": (UNREAD, READ),
    "all": (ACTIVE, UNREAD, READ),
}
_RUNNING = f"s.execution_state = '{ExecutionState.RUNNING}'"
_UNREAD = (
    f"s.execution_state <> '{ExecutionState.RUNNING}' AND (c.session_version IS NULL OR c.session_version < s.version)"
)
_GROUP_CONDITION = {
    ACTIVE: _RUNNING,
    UNREAD: _UNREAD,
    READ: f"s.execution_state <> '{ExecutionState.RUNNING}' AND c.session_version >= s.version",
}
_STATE_CONDITION = {
    "default": f"({_RUNNING} OR ({_UNREAD}))",
    "running": _RUNNING,
    "unread": _UNREAD,
    "terminal": f"s.execution_state = '{ExecutionState.TERMINAL}'",
    "idle": f"s.execution_state = '{ExecutionState.IDLE}'",
    "all": "TRUE",
}
_ACTIVITY = "COALESCE(s.last_activity_at, s.updated_at)"
_ORDER = f"{_ACTIVITY} DESC, s.updated_at DESC, s.session_id"
# The stamp of the last write that could move the session in this reader's inbox: the
# session's own (version or activity) or the reader's read of it. Both come from one counter.
_CHANGED = "GREATEST(s.inbox_version, COALESCE(c.read_version, 0))"
# Unchanged since the walk's edge. Plain column comparisons, so the planner sees from the
# columns' statistics that nearly every row passes and keeps the index-ordered scans.
_UNCHANGED = "s.inbox_version <= %(edge)s AND (c.read_version IS NULL OR c.read_version <= %(edge)s)"


@dataclass
class SessionPage:
    sessions: list  # Session instances, each with `cursor_version`, `cursor_read_at`, `cursor_read_version`
    cursor: str | None
    next_page_token: str | None


# --- one session ---------------------------------------------------------------------------


def session_get(*, session_id: str, scope: Scope) -> Session:
    session = Session.objects.filter(scope.q(), pk=session_id).first()
    if session is None:
        raise not_found("session", session_id)
    return session


def session_with_cursor(*, session_id: str, reader_id: str | None, scope: Scope) -> Session:
    """The session, with the reader's cursor (`cursor_version`, `cursor_read_at`, or None)."""
    session = session_get(session_id=session_id, scope=scope)
    session.cursor_version = session.cursor_read_at = None
    if reader_id is not None:
        cursor = session.read_cursors.filter(reader_id=reader_id).values_list("session_version", "read_at").first()
        if cursor is not None:
            session.cursor_version, session.cursor_read_at = cursor
    return session


# --- the inbox and the feed ----------------------------------------------------------------


class _Query:
    """The FROM and WHERE every list query shares: the key's scope, the backend, the reader."""

    def __init__(self, *, scope: Scope, backend_profile: str | None, reader_id: str | None):
        self.params: dict = {"reader": reader_id}
        conditions, ranges, scoped = [], [], []
        self.scope_columns = [
            column
            for column, value in (("tenant_id", scope.tenant_id), ("project_id", scope.project_id))
            if value is not None
        ]
        for column, value in (
            ("tenant_id", scope.tenant_id),
            ("project_id", scope.project_id),
            ("backend_profile", backend_profile),
        ):
            if value is not None:
                conditions.append(f"s.{column} = %({column})s")
                self.params[column] = value
                if column != "backend_profile":
                    scoped.append(f"s.{column}")
                    ranges.append(f"s.{column} BETWEEN %({column})s AND %({column})s")
                else:
                    ranges.append(conditions[-1])
        self.where = " AND ".join(conditions) or "TRUE"
        # Version order, led by the scope's columns. Written as ranges, the scope's columns stay
        # in the sort (an equality would make the planner drop them), so only the scope's own
        # version index yields that order: the global one, filtered, may walk past other
        # tenants' newer rows first.
        self.version_where = " AND ".join(ranges) or "TRUE"
        self.version_order = ", ".join([*scoped, "s.version"])
        self.version_order_desc = ", ".join(f"{column} DESC" for column in [*scoped, "s.version"])
        if reader_id is None:
            self.source = "agent_sessions_session s"
            self.columns = (
                "s.*, NULL::bigint AS cursor_version, NULL::timestamptz AS cursor_read_at, "
                "NULL::bigint AS cursor_read_version"
            )
            self.join_free = True
        else:
            self.source = (
                "agent_sessions_session s LEFT JOIN agent_sessions_sessionreadcursor c "
                "ON c.session_id = s.session_id AND c.reader_id = %(reader)s"
            )
            self.columns = (
                "s.*, c.session_version AS cursor_version, c.read_at AS cursor_read_at, "
                "c.read_version AS cursor_read_version"
            )
            self.join_free = False

    def scope_where(self, alias: str) -> str:
        return " AND ".join(f"{alias}.{column} = %({column})s" for column in self.scope_columns) or "TRUE"

    def sql(self, condition: str, *, version_ordered: bool = False) -> str:
        where = self.version_where if version_ordered else self.where
        return f"SELECT {self.columns} FROM {self.source} WHERE {where} AND {condition}"

    def finish(self, sql: str) -> str:
        if self.join_free:  # no reader: no cursor, every inactive session is unread
            sql = sql.replace("c.session_version", "NULL::bigint").replace("c.read_at", "NULL::timestamptz")
            sql = sql.replace("c.read_version", "NULL::bigint")
        return sql

    def run(self, sql: str, params: dict) -> list[Session]:
        return list(Session.objects.raw(self.finish(sql), {**self.params, **params}))


def _keyset(prefix: str) -> str:
    """After a position in the inbox order (activity and update time descending, id ascending)."""
    return (
        f"({_ACTIVITY} <= %({prefix}a)s AND ({_ACTIVITY} < %({prefix}a)s OR s.updated_at < %({prefix}u)s "
        f"OR (s.updated_at = %({prefix}u)s AND s.session_id > %({prefix}i)s)))"
    )


def _main_page(query: _Query, *, state, position, edge: int, limit: int) -> list[Session]:
    """The walk's snapshot part: the sessions unchanged since its edge, after `position`."""
    branches, params = [], {"limit": limit, "edge": edge}
    for group in GROUPS[state]:
        if position is not None and group < position["g"]:
            continue
        conditions = [_GROUP_CONDITION[group], _UNCHANGED]
        if state in ("terminal", "idle"):
            conditions.append(_STATE_CONDITION[state])
        if position is not None and group == position["g"]:
            conditions.append(_keyset("k_"))
            params.update(k_a=position["a"], k_u=position["u"], k_i=position["i"])
        sql = query.sql(" AND ".join(conditions)).replace("SELECT ", f"SELECT {group} AS attention_group, ", 1)
        branches.append(f"({sql} ORDER BY {_ORDER} LIMIT %(limit)s)")
    if not branches:
        return []
    order = _ORDER.replace("s.", "")
    return query.run(
        f"SELECT * FROM ({' UNION ALL '.join(branches)}) page ORDER BY attention_group, {order} LIMIT %(limit)s", params
    )


def _tail_page(query: _Query, *, state, edge: int, position, limit: int) -> list[Session]:
    """The walk's tail: the sessions changed after its edge, in the order of their last change,
    after `position`. They are found from the stamps' indexes, so a page reads about as many
    rows as changed since the walk began, not the inbox."""
    # A stamp at or above the position's: the session's own, or this reader's read of it.
    low = position["c"] if position is not None else edge + 1
    params = {"edge": edge, "low": low, "limit": limit}
    if query.join_free:
        changed = "s.inbox_version >= %(low)s"
    else:
        changed = (
            "s.session_id IN (SELECT m.session_id FROM agent_sessions_session m "
            f"WHERE {query.scope_where('m')} AND m.inbox_version >= %(low)s UNION ALL "
            "SELECT r.session_id FROM agent_sessions_sessionreadcursor r "
            "WHERE r.reader_id = %(reader)s AND r.read_version >= %(low)s)"
        )
    conditions = [_STATE_CONDITION[state], changed, f"{_CHANGED} > %(edge)s"]
    if position is not None:
        conditions.append(f"({_CHANGED}, s.session_id) > (%(t_c)s, %(t_i)s)")
        params.update(t_c=position["c"], t_i=position["i"])
    sql = query.sql(" AND ".join(conditions)).replace("SELECT ", f"SELECT {_CHANGED} AS changed_version, ", 1)
    return query.run(f"{sql} ORDER BY {_CHANGED}, s.session_id LIMIT %(limit)s", params)


def _edge_and_watermark(query: _Query, state: str) -> tuple[int, str | None]:
    """The session counter's value (a walk's edge) and the highest version among the matching
    sessions, in one statement, so in one snapshot with each other."""
    sql = (
        query.sql(_STATE_CONDITION[state], version_ordered=True).replace(
            f"SELECT {query.columns} ", "SELECT s.version ", 1
        )
        + f" ORDER BY {query.version_order_desc} LIMIT 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT value FROM agentrun_counter WHERE name = %(counter)s), ({query.finish(sql)})",
            {**query.params, "counter": counters.SESSIONS},
        )
        edge, version = cursor.fetchone()
    return edge or 0, (str(version) if version is not None else None)


def _filters_key(state, backend_profile, reader_id) -> list:
    return [state, backend_profile, reader_id]


def _encode_token(token: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(token, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_token(raw: str, filters: list) -> dict:
    try:
        token = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if token["f"] != filters or token["p"] not in ("main", "tail"):
            raise ValueError("token of another listing")
        if not _is_stamp(token["e"]):
            raise ValueError("bad edge")
        position = token.get("k")
        if position is not None:
            if not isinstance(position["i"], str) or is_unstorable(position["i"]):
                raise ValueError("bad id")
            if token["p"] == "main":
                position["a"], position["u"] = (datetime.fromisoformat(position[key]) for key in ("a", "u"))
                if position["g"] not in (ACTIVE, UNREAD, READ):
                    raise ValueError("bad group")
            elif not _is_stamp(position["c"]):
                raise ValueError("bad stamp")
        return token
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error, UnicodeDecodeError, AttributeError):
        raise invalid(
            "pageToken is not a token of this listing; start again without it", parameter="pageToken"
        ) from None


def _is_stamp(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _main_position(session: Session) -> dict:
    activity = session.last_activity_at or session.updated_at
    return {
        "g": session.attention_group,
        "a": activity.isoformat(),
        "u": session.updated_at.isoformat(),
        "i": session.session_id,
    }


def session_list(
    *,
    scope: Scope,
    state: str = "default",
    backend_profile: str | None = None,
    reader_id: str | None = None,
    cursor: int | None = None,
    page_token: str | None = None,
    limit: int = 50,
) -> SessionPage:
    """The inbox (sorted, paged by `page_token`) or, with `cursor`, the change feed."""
    if state not in STATES:
        raise invalid(f"state must be one of {', '.join(STATES)}", parameter="state")
    if cursor is not None and page_token is not None:
        raise invalid("give either cursor (the change feed) or pageToken (the inbox), not both", parameter="pageToken")
    query = _Query(scope=scope, backend_profile=backend_profile, reader_id=reader_id)
    if cursor is not None:
        sessions = query.run(
            query.sql(f"{_STATE_CONDITION[state]} AND s.version > %(cursor)s", version_ordered=True)
            + f" ORDER BY {query.version_order} LIMIT %(limit)s",
            {"cursor": cursor, "limit": limit},
        )
        return SessionPage(sessions, str(sessions[-1].version) if sessions else str(cursor), None)
    filters = _filters_key(state, backend_profile, reader_id)
    token = _decode_token(page_token, filters) if page_token is not None else None
    nested = connection.in_atomic_block
    with transaction.atomic():
        if not nested:  # one snapshot for the page, its tail and its watermark
            with connection.cursor() as db:
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        counter_value, watermark = _edge_and_watermark(query, state)
        # A first page takes the counter as the walk's edge. Its own page is filtered by that
        # edge too, so it is the walk's snapshot even where it shares no snapshot with the
        # counter's read (inside a caller's transaction, READ COMMITTED).
        if token is None:
            edge, phase, position = counter_value, "main", None
        else:
            edge, phase, position = token["e"], token["p"], token.get("k")
        main = []
        if phase == "main":
            main = _main_page(query, state=state, position=position, edge=edge, limit=limit + 1)
        # One row more than the page tells whether there is a next page.
        if len(main) > limit:
            sessions = main[:limit]
            next_token = {"p": "main", "k": _main_position(sessions[-1])}
        else:
            sessions = main
            remaining = limit - len(sessions)
            tail = _tail_page(
                query, state=state, edge=edge, position=position if phase == "tail" else None, limit=remaining + 1
            )
            sessions += tail[:remaining]
            if len(tail) <= remaining:
                next_token = None
            elif remaining == 0:
                next_token = {"p": "tail", "k": None}  # the snapshot ended with this page
            else:
                last = tail[remaining - 1]
                next_token = {"p": "tail", "k": {"c": last.changed_version, "i": last.session_id}}
    if next_token is not None:
        next_token.update(f=filters, e=edge)
    return SessionPage(sessions, watermark, _encode_token(next_token) if next_token is not None else None)


# --- storage collection --------------------------------------------------------------------


def gc_candidates(*, now: datetime, limit: int) -> list[Session]:
    """Sessions whose PVC has expired (the boundary counts), oldest update first (SPEC §3.5)."""
    return list(
        Session.objects.filter(storage_kind=StorageKind.PVC, expires_at__isnull=False, expires_at__lte=now)
        .exclude(storage_pvc_name__isnull=True)
        .exclude(storage_pvc_name="")
        .order_by("updated_at", "session_id")[:limit]
    )
