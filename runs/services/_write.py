"""The write core every run, event and command service shares: the run's row lock, the events
of one operation collected and written in one round trip, and the end of a run.

A service locks the run first (`_lock_run`, or `_lock_run_for_append` on the append's path),
re-checks its state and holder under the lock, then records what it did through a `_RunWrite`:
the events get gapless seqs from the run's counter, and the events, the counter, the session's
event touch and the wake-up NOTIFY reach the database as one statement. Private to the services
package.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from django.db import connection, transaction
from django.db.models.functions import Now
from psycopg import sql

from agentrun import metrics, notify, webhooks
from agentrun.auth import Scope
from agentrun.errors import CANCELLED, RUNNER_LEASE_CONFLICT, SCHEMA_INVALID, AgentRunError, conflict, not_found
from agentrun.ids import new_id
from agentrun.redaction import redact
from agentrun.sqlnames import column, table
from agentrun.vocabulary import run_status_for
from runs.models import COMMAND_OPEN, Command, CommandState, EventBatch, Run, RunEvent, RunStatus
from sessions import services as session_services

UNRESTRICTED = Scope.unrestricted()
DEFAULT_CANCEL_REASON = "cancel requested"
RUN_FINISHED_MESSAGE = "run finished"

# A statement that rides in an append's round trip, with its parameters.
Statement = tuple[sql.Composable, list[Any]]


# --- locks ---------------------------------------------------------------------------------


def _lock_run(run_id: str, scope: Scope) -> Run:
    """The run, row-locked, with `db_now` (the database clock) for this transaction."""
    locked = Run.objects.select_for_update(no_key=True).filter(scope.q(run="id"), pk=run_id)
    run = locked.annotate(db_now=Now()).first()  # type: ignore[no-redef]  # - Run declares it, for locked rows
    if run is None:
        raise not_found("run", run_id)
    return run


_SCOPE_FIELDS = ("tenant_id", "project_id", "id")


@functools.cache
def _lock_run_for_append_sql(scoped: tuple[str, ...]) -> sql.Composed:
    """The append's lock and batch lookup, for a scope that restricts the `scoped` run fields."""
    conditions = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(column(Run, name, "r")) for name in ("id", *scoped))
    selected = sql.SQL(", ").join(
        [
            *(
                column(Run, name, "r")
                for name in ("status", "claimed_by", "lease_epoch", "last_event_seq", "session_id", "created_at")
            ),
            sql.SQL("statement_timestamp()"),
            *(column(EventBatch, name, "b") for name in ("payload_hash", "first_seq", "count")),
        ]
    )
    return sql.SQL(
        "SELECT {selected} FROM {run_table} r LEFT JOIN {batch_table} b ON {batch_run} = {run_id} AND {batch_key} = %s "
        "WHERE {conditions} FOR NO KEY UPDATE OF r"
    ).format(
        selected=selected,
        run_table=table(Run),
        batch_table=table(EventBatch),
        batch_run=column(EventBatch, "run", "b"),
        run_id=column(Run, "id", "r"),
        batch_key=column(EventBatch, "batch_key", "b"),
        conditions=conditions,
    )


def _lock_run_for_append(run_id: str, scope: Scope, batch_key: str | None) -> tuple[Run, tuple | None]:
    """`_lock_run` for the hottest path, in one statement: the columns an append reads and the
    batch already recorded under `batch_key` (payload_hash, first_seq, count), if any. The run
    returned carries only those columns; it is never saved."""
    scoped = {"tenant_id": scope.tenant_id, "project_id": scope.project_id, "id": scope.run_id}
    restricted = tuple(name for name in _SCOPE_FIELDS if scoped[name] is not None)
    params = [batch_key, run_id, *(scoped[name] for name in restricted)]
    # Raw: the ORM cannot lock the run and left-join its batch in one statement (FOR NO KEY UPDATE OF r).
    with connection.cursor() as cursor:
        cursor.execute(_lock_run_for_append_sql(restricted), params)
        row = cursor.fetchone()
    if row is None:
        raise not_found("run", run_id)
    status, claimed_by, lease_epoch, last_event_seq, session_id, created_at, db_now, *batch = row
    run = Run(
        id=run_id,
        status=status,
        claimed_by=claimed_by,
        lease_epoch=lease_epoch,
        last_event_seq=last_event_seq,
        session_id=session_id,
        created_at=created_at,  # the events' partition key
    )
    run.db_now = db_now
    return run, (tuple(batch) if batch[0] is not None else None)


def _terminal_run_error(run: Run) -> AgentRunError:
    kind = run.failure_kind or (CANCELLED if run.status == RunStatus.CANCELLED else SCHEMA_INVALID)
    return conflict(kind, f"run {run.id} is already terminal: {run.status}", runId=run.id, status=run.status)


def _check_holder(run: Run, runner_id: str, lease_epoch: int) -> None:
    if run.claimed_by != runner_id or run.lease_epoch != lease_epoch:
        raise conflict(
            RUNNER_LEASE_CONFLICT,
            f"run {run.id} is not held by runner {runner_id} at lease epoch {lease_epoch}",
            runId=run.id,
            leaseEpoch=run.lease_epoch,
        )


# --- events of one operation ---------------------------------------------------------------


class NewEvent:
    """An event this operation appends: what the insert and the response need, without the
    cost of a model instance per row (a batch holds up to 500)."""

    __slots__ = ("created_at", "id", "payload", "run_id", "seq", "type")

    def __init__(
        self,
        *,
        id: str,  # noqa: A002 - the wire's names
        run_id: str,
        seq: int,
        type: str,  # noqa: A002 - the wire's names
        payload: dict,
        created_at: datetime,
    ):
        self.id, self.run_id, self.seq, self.type = id, run_id, seq, type
        self.payload, self.created_at = payload, created_at


class _RunWrite:
    """Collects the events of one operation on a locked run and writes them in one insert,
    with one update of the run's seq counter and one session touch."""

    def __init__(self, run: Run):
        self.run = run
        self.at: datetime = run.db_now
        self.events: list[NewEvent] = []

    def emit(self, event_type: str, payload: dict, *, posted: bool = False) -> NewEvent:
        """Add an event. `posted`: a runner's, whose payload lists what was sanitized."""
        self.run.last_event_seq += 1
        event = NewEvent(
            id=new_id("evt"),
            run_id=self.run.id,
            seq=self.run.last_event_seq,
            type=event_type,
            payload=redact(payload, list_sanitized=posted),
            created_at=self.at,
        )
        self.events.append(event)
        return event

    def save(
        self, *, bookkeeping: dict | None = None, extra_statements: Sequence[Statement] = (), **fields: Any
    ) -> None:
        """Write the events and the run's changed fields (every run change sets updatedAt;
        `bookkeeping`, such as seq counters, is written without counting as a change).

        The events, the session's event touch, the run's seq counter, the wake-up NOTIFY and any
        `extra_statements` go to the database as one statement: this is every append's path.
        """
        if fields:
            fields["updated_at"] = self.at
        fields.update(bookkeeping or {})
        if fields:
            Run.objects.filter(pk=self.run.pk).update(**fields)
            for name, value in fields.items():
                setattr(self.run, name, value)
        if self.events:
            _write_events(self.run, self.events, self.at, extra_statements)


@functools.cache
def _insert_events_sql() -> sql.Composed:
    names = ("id", "run", "seq", "type", "payload", "created_at", "run_created_at")
    event = {name: column(RunEvent, name) for name in names}
    return sql.SQL(
        "INSERT INTO {table} ({id}, {run}, {seq}, {type}, {payload}, {created_at}, {run_created_at}) "
        "SELECT e.id, %s, e.seq, e.type, e.payload::jsonb, %s, %s "
        "FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) AS e(id, seq, type, payload)"
    ).format(table=table(RunEvent), **event)


@functools.cache
def _run_seq_update_sql() -> sql.Composed:
    return sql.SQL("UPDATE {table} SET {last_event_seq} = %s WHERE {id} = %s RETURNING pg_notify(%s, %s)").format(
        table=table(Run), last_event_seq=column(Run, "last_event_seq"), id=column(Run, "id")
    )


# The append's statement as text, per shape (the CTEs it is made of): composing it, and psycopg
# rendering the composition, cost more than the rest of an append's Python. Keyed by the parts'
# identities, each entry holding its parts (so an id is not reused while its entry lives);
# bounded, in case a caller ever passes parts made anew for each call.
_APPEND_STATEMENTS: dict[tuple[int, ...], tuple[tuple[sql.Composable, ...], str]] = {}


def _append_statement(parts: tuple[sql.Composable, ...]) -> str | sql.Composed:
    key = tuple(id(part) for part in parts)
    cached = _APPEND_STATEMENTS.get(key)
    if cached is not None and all(a is b for a, b in zip(cached[0], parts, strict=True)):
        return cached[1]
    statement = sql.SQL("WITH {} {}").format(
        sql.SQL(", ").join(
            sql.SQL("{} AS ({})").format(sql.Identifier(f"w{index}"), part) for index, part in enumerate(parts)
        ),
        _run_seq_update_sql(),
    )
    if len(_APPEND_STATEMENTS) >= 32:
        return statement
    text = statement.as_string(None)
    _APPEND_STATEMENTS[key] = (parts, text)
    return text


def _write_events(run: Run, events: list[NewEvent], at: datetime, extra_statements: Sequence[Statement]) -> None:
    """One round trip for an append of any size: the rows through unnest of column arrays (so
    neither the statement nor its cost in Python grows per row), then the writes that go with
    them as data-modifying CTEs."""
    ctes: list[Statement] = [
        (
            _insert_events_sql(),
            [
                run.id,
                at,
                run.created_at,  # the partition key (runs.retention)
                [event.id for event in events],
                [event.seq for event in events],
                [event.type for event in events],
                [json.dumps(event.payload, ensure_ascii=False) for event in events],
            ],
        ),
        *extra_statements,
    ]
    if run.session_id:
        ctes.append(
            session_services.session_event_touch_sql(
                session_id=run.session_id, last_event_seq=run.last_event_seq, at=at
            )
        )
    # Raw: the ORM has no multi-row insert from arrays nor data-modifying CTEs, and each of these
    # writes as its own ORM call would be a round trip more on every append.
    statement = _append_statement(tuple(cte for cte, _ in ctes))
    params = [param for _, statement_params in ctes for param in statement_params]
    params += [run.last_event_seq, run.id, notify.CHANNEL, notify.run_topic(run.id)]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
    transaction.on_commit(functools.partial(metrics.EVENTS_APPENDED.inc, len(events)))


# --- commands' terminal event and the end of a run -----------------------------------------


def command_terminal_payload(
    *,
    command_id: str,
    state: str,
    terminal_status: str,
    failure_kind: str | None,
    message: str | None,
    turn: tuple[str | None, str | None] | None = None,
) -> dict:
    """The payload of the `command-terminal` event a command emits when it ends. A runner's
    finish passes `turn` (its thread and turn ids) and says every field, None included; a
    cancel says its message only when it has one."""
    payload = {
        "phase": "command-terminal",
        "commandId": command_id,
        "state": state,
        "terminalStatus": terminal_status,
        "failureKind": failure_kind,
    }
    if turn is not None:
        thread_id, turn_id = turn
        payload.update(message=message, threadId=thread_id, turnId=turn_id)
    elif message is not None:
        payload["message"] = message
    return payload


def _cancel_open_commands(write: _RunWrite, *, message: str | None) -> None:
    """Cancel the run's open commands in seq order, one timestamp, an event each (cancelRun's
    cascade; finishRun adds `message`). The session is touched once, by the run's end."""
    open_commands = list(
        Command.objects.filter(run_id=write.run.id, state__in=COMMAND_OPEN).order_by("seq").values_list("id", flat=True)
    )
    if not open_commands:
        return
    Command.objects.filter(pk__in=open_commands).update(
        state=CommandState.CANCELLED,
        terminal_status=CANCELLED,
        failure_kind=CANCELLED,
        failure_message=message,
        updated_at=write.at,
    )
    for command_id in open_commands:
        write.emit(
            "backend_status",
            command_terminal_payload(
                command_id=command_id,
                state=CommandState.CANCELLED,
                terminal_status=CANCELLED,
                failure_kind=CANCELLED,
                message=message,
            ),
        )


def _thread_update(write: _RunWrite, *, thread_id: str, turn_id: str | None) -> dict:
    """The session learns the thread; the run's ref is rebuilt from the session (A4, A8).
    Only for a run with a session, whose ref run_create set with its session id."""
    run = write.run
    new_ref = session_services.session_thread_update(
        run_session_ref=cast(dict, run.session_ref),
        tenant_id=run.tenant_id,
        project_id=run.project_id,
        backend_profile=run.backend_profile,
        run_id=run.id,
        thread_id=thread_id,
        turn_id=turn_id,
        at=write.at,
    )
    run.session_ref = new_ref
    write.emit(
        "backend_status",
        {"phase": "session-updated", "sessionRef": session_services.summarize_session_ref(new_ref), "turnId": turn_id},
    )
    return new_ref


def _end_run(
    write: _RunWrite,
    *,
    terminal_status: str,
    failure_kind: str | None,
    failure_message: str | None,
    thread_id: str | None = None,
    turn_id: str | None = None,
    cancel_reason: str | None = None,
) -> Run:
    """Finish or cancel a locked, non-terminal run: cascade its open commands, record the thread,
    emit the terminal event, release the lease (claimedBy is kept), and end the session's turn."""
    run = write.run
    cancelling = cancel_reason is not None
    _cancel_open_commands(write, message=None if cancelling else RUN_FINISHED_MESSAGE)
    fields: dict[str, Any] = {}
    if thread_id and run.session_id:
        fields["session_ref"] = _thread_update(write, thread_id=thread_id, turn_id=turn_id)
    if cancelling:
        write.emit("backend_status", {"phase": "cancel-requested", "reason": cancel_reason})
    write.emit(
        "terminal_status",
        {"terminalStatus": terminal_status, "failureKind": failure_kind, "message": failure_message},
    )
    # Whoever follows runs (the queue) learns at commit that one ended.
    notify.notify(notify.RUNS_ENDED)
    if run.session_id:
        session_services.session_touch_run_ended(
            session_id=run.session_id,
            run_id=run.id,
            terminal_status=terminal_status,
            failure_kind=failure_kind,
            at=write.at,
        )
    write.save(
        **fields,
        status=run_status_for(terminal_status),
        terminal_status=terminal_status,
        failure_kind=failure_kind,
        failure_message=failure_message,
        lease_expires_at=None,
    )
    if run.webhook_url:
        # The outbox: the webhook is sent if and only if this end commits.
        webhooks.enqueue(
            tenant_id=run.tenant_id,
            url=run.webhook_url,
            event_type=webhooks.RUN_ENDED,
            at=write.at,
            run_id=run.id,
            data={
                "runId": run.id,
                "tenantId": run.tenant_id,
                "projectId": run.project_id,
                "sessionId": run.session_id,
                "status": run.status,
                "terminalStatus": terminal_status,
                "failureKind": failure_kind,
                "failureMessage": failure_message,
                "queueTaskId": (run.extra or {}).get("queueTaskId"),
            },
        )
    return run
