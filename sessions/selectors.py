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
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from psycopg import sql

from agentrun import counters
from agentrun.auth import Scope
from agentrun.errors import invalid, not_found
from agentrun.sqlnames import column, table
from agentrun.text import is_unstorable
from sessions.models import ExecutionState, Session, SessionReadCursor, StorageKind

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
# The list statements are written by hand (the ORM cannot say them in one round trip: the
# attention groups as a UNION ALL of index-ordered scans, the walk's tail found from the stamps'
# indexes, the counter read in the page's snapshot). Sessions are `s`, the reader's cursors `c`.
NULL_BIGINT, NULL_TIMESTAMPTZ = sql.SQL("NULL::bigint"), sql.SQL("NULL::timestamptz")


def _s(name: str) -> sql.Identifier:
    return column(Session, name, "s")


def _c(name: str) -> sql.Identifier:
    return column(SessionReadCursor, name, "c")


def _state_is(state: ExecutionState, *, negated: bool = False) -> sql.Composed:
    return sql.SQL("{} <> {}" if negated else "{} = {}").format(_s("execution_state"), sql.Literal(state.value))


def _inbox_order(alias: str | None) -> sql.Composed:
    """Activity (or the update time when there was none) newest first, then update time, then id
    (sessions.models.INBOX_ORDER); `alias` None for the columns of a subquery's rows."""

    def name(field: str) -> sql.Identifier:
        return column(Session, field, alias)

    return sql.SQL("COALESCE({activity}, {updated}) DESC, {updated} DESC, {session}").format(
        activity=name("last_activity_at"), updated=name("updated_at"), session=name("session_id")
    )


def _and(conditions: Sequence[sql.Composable]) -> sql.Composable:
    return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("TRUE")


_RUNNING = _state_is(ExecutionState.RUNNING)
_ACTIVITY = sql.SQL("COALESCE({}, {})").format(_s("last_activity_at"), _s("updated_at"))
_ORDER = _inbox_order("s")


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
    """The FROM and WHERE every list query of one shape shares (which of the key's scope, the
    backend and the reader are given; their values are parameters), and the conditions on the
    reader's cursor: without a reader there is no cursor to join, its columns are NULL and every
    inactive session is unread. One instance per shape (`_query`), so each statement is composed
    and rendered once per process (`_statement`), not per request."""

    def __init__(self, *, filtered: tuple[str, ...], reader: bool):
        conditions: list[sql.Composable] = []
        ranges: list[sql.Composable] = []
        scoped: list[sql.Composable] = []
        self.scope_fields = [field for field in filtered if field != "backend_profile"]
        for field in filtered:
            placeholder = sql.Placeholder(field)
            conditions.append(sql.SQL("{} = {}").format(_s(field), placeholder))
            if field != "backend_profile":
                scoped.append(_s(field))
                ranges.append(sql.SQL("{0} BETWEEN {1} AND {1}").format(_s(field), placeholder))
            else:
                ranges.append(conditions[-1])
        self.where = _and(conditions)
        # Version order, led by the scope's columns. Written as ranges, the scope's columns stay
        # in the sort (an equality would make the planner drop them), so only the scope's own
        # version index yields that order: the global one, filtered, may walk past other
        # tenants' newer rows first.
        self.version_where = _and(ranges)
        self.version_order = sql.SQL(", ").join([*scoped, _s("version")])
        self.version_order_desc = sql.SQL(", ").join(
            sql.SQL("{} DESC").format(name) for name in [*scoped, _s("version")]
        )
        self.join_free = not reader
        if self.join_free:
            self.source: sql.Composable = sql.SQL("{} s").format(table(Session))
            self.cursor_version: sql.Composable = NULL_BIGINT
            self.cursor_read_at: sql.Composable = NULL_TIMESTAMPTZ
            self.cursor_read_version: sql.Composable = NULL_BIGINT
        else:
            self.source = sql.SQL(
                "{session} s LEFT JOIN {cursor} c ON {c_session} = {s_session} AND {reader} = %(reader)s"
            ).format(
                session=table(Session),
                cursor=table(SessionReadCursor),
                c_session=_c("session"),
                s_session=_s("session_id"),
                reader=_c("reader_id"),
            )
            self.cursor_version, self.cursor_read_at = _c("session_version"), _c("read_at")
            self.cursor_read_version = _c("read_version")
        self.columns = sql.SQL("s.*, {} AS cursor_version, {} AS cursor_read_at, {} AS cursor_read_version").format(
            self.cursor_version, self.cursor_read_at, self.cursor_read_version
        )
        unread = sql.SQL("{} AND ({cursor} IS NULL OR {cursor} < {version})").format(
            _state_is(ExecutionState.RUNNING, negated=True), cursor=self.cursor_version, version=_s("version")
        )
        self.group_condition = {
            ACTIVE: _RUNNING,
            UNREAD: unread,
            READ: sql.SQL("{} AND {} >= {}").format(
                _state_is(ExecutionState.RUNNING, negated=True), self.cursor_version, _s("version")
            ),
        }
        self.state_condition: dict[str, sql.Composable] = {
            "default": sql.SQL("({} OR ({}))").format(_RUNNING, unread),
            "running": _RUNNING,
            "unread": unread,
            "terminal": _state_is(ExecutionState.TERMINAL),
            "idle": _state_is(ExecutionState.IDLE),
            "all": sql.SQL("TRUE"),
        }
        # The stamp of the last write that could move the session in this reader's inbox: the
        # session's own (version or activity) or the reader's read of it. Both come from one counter.
        self.changed = sql.SQL("GREATEST({}, COALESCE({}, 0))").format(_s("inbox_version"), self.cursor_read_version)
        # Unchanged since the walk's edge. Plain column comparisons, so the planner sees from the
        # columns' statistics that nearly every row passes and keeps the index-ordered scans.
        self.unchanged = sql.SQL("{} <= %(edge)s AND ({read} IS NULL OR {read} <= %(edge)s)").format(
            _s("inbox_version"), read=self.cursor_read_version
        )

    def scope_where(self, alias: str) -> sql.Composable:
        return _and(
            [
                sql.SQL("{} = {}").format(column(Session, field, alias), sql.Placeholder(field))
                for field in self.scope_fields
            ]
        )

    def select(
        self,
        condition: sql.Composable,
        *,
        first: sql.Composable | None = None,
        columns: sql.Composable | None = None,
        version_ordered: bool = False,
    ) -> sql.Composed:
        """SELECT the sessions (with `first` as the leading column, or only `columns`) in the
        list's scope where `condition` holds."""
        selected = columns if columns is not None else self.columns
        if first is not None:
            selected = sql.SQL("{}, {}").format(first, selected)
        where = self.version_where if version_ordered else self.where
        return sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(selected, self.source, where, condition)


@functools.cache
def _query(filtered: tuple[str, ...], reader: bool) -> _Query:
    return _Query(filtered=filtered, reader=reader)


@functools.cache
def _statement(build: Callable[..., sql.Composable], query: _Query, *shape: str | int | bool | None) -> str:
    """The text of `build(query, *shape)`, composed once per shape: a statement's text depends
    on the list's shape alone, never on a value (those are parameters)."""
    return build(query, *shape).as_string(None)


@dataclass(frozen=True)
class _List:
    """One listing: its query's shape and the values of its parameters."""

    query: _Query
    params: dict[str, Any]

    @classmethod
    def of(cls, *, scope: Scope, backend_profile: str | None, reader_id: str | None) -> _List:
        values = {"tenant_id": scope.tenant_id, "project_id": scope.project_id, "backend_profile": backend_profile}
        params = {field: value for field, value in values.items() if value is not None}
        return cls(_query(tuple(params), reader_id is not None), {"reader": reader_id, **params})

    def run(self, statement: str, params: dict[str, Any]) -> list[Session]:
        # Raw: a page is one index-ordered statement (see above).
        return list(Session.objects.raw(statement, {**self.params, **params}))


def _keyset() -> sql.Composed:
    """After a position in the inbox order (activity and update time descending, id ascending)."""
    return sql.SQL(
        "({activity} <= %(k_a)s AND ({activity} < %(k_a)s OR {updated} < %(k_u)s "
        "OR ({updated} = %(k_u)s AND {session} > %(k_i)s)))"
    ).format(activity=_ACTIVITY, updated=_s("updated_at"), session=_s("session_id"))


def _groups_from(state: str, position_group: int | None) -> list[int]:
    """The state's attention groups a walk has still to read: from the position's group on."""
    return [group for group in GROUPS[state] if position_group is None or group >= position_group]


def _main_statement(query: _Query, state: str, position_group: int | None) -> sql.Composed:
    """The walk's snapshot part: the sessions unchanged since its edge, from the position's
    group on (after its keyset position in that group)."""
    branches: list[sql.Composable] = []
    for group in _groups_from(state, position_group):
        conditions: list[sql.Composable] = [query.group_condition[group], query.unchanged]
        if state in ("terminal", "idle"):
            conditions.append(query.state_condition[state])
        if group == position_group:
            conditions.append(_keyset())
        branch = query.select(_and(conditions), first=sql.SQL("{} AS attention_group").format(sql.Literal(group)))
        branches.append(sql.SQL("({} ORDER BY {} LIMIT %(limit)s)").format(branch, _ORDER))
    return sql.SQL("SELECT * FROM ({}) page ORDER BY attention_group, {} LIMIT %(limit)s").format(
        sql.SQL(" UNION ALL ").join(branches), _inbox_order(None)
    )


def _main_page(listing: _List, *, state: str, position: dict[str, Any] | None, edge: int, limit: int) -> list[Session]:
    position_group = position["g"] if position is not None else None
    if not _groups_from(state, position_group):
        return []
    params: dict[str, Any] = {"limit": limit, "edge": edge}
    if position is not None:
        params.update(k_a=position["a"], k_u=position["u"], k_i=position["i"])
    return listing.run(_statement(_main_statement, listing.query, state, position_group), params)


def _tail_statement(query: _Query, state: str, positioned: bool) -> sql.Composed:
    """The walk's tail: the sessions changed after its edge, in the order of their last change,
    after the position if `positioned`. They are found from the stamps' indexes, so a page reads
    about as many rows as changed since the walk began, not the inbox."""
    # A stamp at or above the position's: the session's own, or this reader's read of it.
    changed: sql.Composable
    if query.join_free:
        changed = sql.SQL("{} >= %(low)s").format(_s("inbox_version"))
    else:
        changed = sql.SQL(
            "{session} IN (SELECT {m_session} FROM {sessions} m WHERE {scope} AND {m_stamp} >= %(low)s UNION ALL "
            "SELECT {r_session} FROM {cursors} r WHERE {r_reader} = %(reader)s AND {r_stamp} >= %(low)s)"
        ).format(
            session=_s("session_id"),
            m_session=column(Session, "session_id", "m"),
            sessions=table(Session),
            scope=query.scope_where("m"),
            m_stamp=column(Session, "inbox_version", "m"),
            r_session=column(SessionReadCursor, "session", "r"),
            cursors=table(SessionReadCursor),
            r_reader=column(SessionReadCursor, "reader_id", "r"),
            r_stamp=column(SessionReadCursor, "read_version", "r"),
        )
    conditions = [query.state_condition[state], changed, sql.SQL("{} > %(edge)s").format(query.changed)]
    if positioned:
        conditions.append(sql.SQL("({}, {}) > (%(t_c)s, %(t_i)s)").format(query.changed, _s("session_id")))
    return sql.SQL("{} ORDER BY {}, {} LIMIT %(limit)s").format(
        query.select(_and(conditions), first=sql.SQL("{} AS changed_version").format(query.changed)),
        query.changed,
        _s("session_id"),
    )


def _tail_page(listing: _List, *, state: str, edge: int, position: dict[str, Any] | None, limit: int) -> list[Session]:
    low = position["c"] if position is not None else edge + 1
    params: dict[str, Any] = {"edge": edge, "low": low, "limit": limit}
    if position is not None:
        params.update(t_c=position["c"], t_i=position["i"])
    return listing.run(_statement(_tail_statement, listing.query, state, position is not None), params)


def _edge_and_watermark_statement(query: _Query, state: str) -> sql.Composed:
    """The session counter's value (a walk's edge) and the highest version among the matching
    sessions, in one statement, so in one snapshot with each other."""
    watermark = sql.SQL("{} ORDER BY {} LIMIT 1").format(
        query.select(query.state_condition[state], columns=_s("version"), version_ordered=True),
        query.version_order_desc,
    )
    return sql.SQL("SELECT ({}), ({})").format(counters.value_sql(counters.SESSIONS), watermark)


def _edge_and_watermark(listing: _List, state: str) -> tuple[int, str | None]:
    with connection.cursor() as cursor:
        # Raw: the counter and the watermark in one statement, so in one snapshot; the ORM would take two.
        cursor.execute(_statement(_edge_and_watermark_statement, listing.query, state), listing.params)
        edge, version = cursor.fetchone()
    return edge or 0, (str(version) if version is not None else None)


def _feed_statement(query: _Query, state: str) -> sql.Composed:
    """The change feed: the matching sessions above the cursor's version, in version order."""
    condition = sql.SQL("{} AND {} > %(cursor)s").format(query.state_condition[state], _s("version"))
    return sql.SQL("{} ORDER BY {} LIMIT %(limit)s").format(
        query.select(condition, version_ordered=True), query.version_order
    )


def _filters_key(state: str, backend_profile: str | None, reader_id: str | None) -> list[str | None]:
    return [state, backend_profile, reader_id]


def _encode_token(token: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(token, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_token(raw: str, filters: list[str | None]) -> dict[str, Any]:
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


def _is_stamp(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _main_position(session: Session) -> dict[str, Any]:
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
    listing = _List.of(scope=scope, backend_profile=backend_profile, reader_id=reader_id)
    if cursor is not None:
        sessions = listing.run(_statement(_feed_statement, listing.query, state), {"cursor": cursor, "limit": limit})
        return SessionPage(sessions, str(sessions[-1].version) if sessions else str(cursor), None)
    filters = _filters_key(state, backend_profile, reader_id)
    token = _decode_token(page_token, filters) if page_token is not None else None
    nested = connection.in_atomic_block
    with transaction.atomic():
        if not nested:  # one snapshot for the page, its tail and its watermark
            with connection.cursor() as db:
                # Raw: Django has no API for a transaction's isolation level.
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        counter_value, watermark = _edge_and_watermark(listing, state)
        # A first page takes the counter as the walk's edge. Its own page is filtered by that
        # edge too, so it is the walk's snapshot even where it shares no snapshot with the
        # counter's read (inside a caller's transaction, READ COMMITTED).
        if token is None:
            edge, phase, position = counter_value, "main", None
        else:
            edge, phase, position = token["e"], token["p"], token.get("k")
        main: list[Session] = []
        next_token: dict[str, Any] | None
        if phase == "main":
            main = _main_page(listing, state=state, position=position, edge=edge, limit=limit + 1)
        # One row more than the page tells whether there is a next page.
        if len(main) > limit:
            sessions = main[:limit]
            next_token = {"p": "main", "k": _main_position(sessions[-1])}
        else:
            sessions = main
            remaining = limit - len(sessions)
            tail = _tail_page(
                listing, state=state, edge=edge, position=position if phase == "tail" else None, limit=remaining + 1
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
