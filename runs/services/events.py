"""A runner's events: a batch appended all or none, with gapless seqs, replayed by its batch key.

The hottest path in agentrun: the lock, the batch lookup and, in a second statement, the events,
the batch's record, the run's counter, the session's touch and the NOTIFY. Two round trips,
whatever the batch's size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from psycopg import sql

from agentrun.auth import Scope
from agentrun.errors import SCHEMA_INVALID, conflict
from agentrun.ids import stable_hash
from agentrun.sqlnames import column, table
from agentrun.transactions import write_transaction
from runs.models import EventBatch, RunEvent
from runs.services._write import (
    UNRESTRICTED,
    NewEvent,
    Statement,
    _check_holder,
    _lock_run_for_append,
    _RunWrite,
)
from runs.validation import validate_event


@functools.cache
def _insert_batch_sql() -> sql.Composed:
    batch = {
        name: column(EventBatch, name)
        for name in ("run", "batch_key", "payload_hash", "first_seq", "count", "created_at")
    }
    return sql.SQL(
        "INSERT INTO {table} ({run}, {batch_key}, {payload_hash}, {first_seq}, {count}, {created_at}) "
        "VALUES (%s, %s, %s, %s, %s, %s)"
    ).format(table=table(EventBatch), **batch)


@write_transaction(durable=True, retry_unique=True)
def event_append(
    *,
    run_id: str,
    runner_id: str,
    lease_epoch: int,
    events: list[tuple[str, dict]],
    batch_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[Sequence[NewEvent | RunEvent], bool]:
    """Append a batch of runner events, all or none, with gapless seqs. Returns (events, created).

    The holder at the current epoch may append; after the run ended, its last holder may still
    flush. A repeated `batch_key` with the same events returns them and writes nothing.
    Errors: 400 for an unknown type or a non-object payload; 404; 409 `runner-lease-conflict`;
    409 `schema-invalid` for a batch key reused with other events.
    """
    for event_type, payload in events:
        validate_event(event_type, payload)
    batch_key = batch_key or None
    run, batch = _lock_run_for_append(run_id, scope, batch_key)
    _check_holder(run, runner_id, lease_epoch)
    extra_statements: list[Statement] = []
    if batch_key:
        batch_hash = stable_hash([[event_type, payload] for event_type, payload in events])
        if batch is not None:
            payload_hash, first_seq, count = batch
            if payload_hash != batch_hash:
                raise conflict(SCHEMA_INVALID, "batchKey reused with different events", batchKey=batch_key)
            replay = RunEvent.objects.filter(run_id=run.id, seq__gte=first_seq, seq__lt=first_seq + count)
            return list(replay.order_by("seq")), False
        # Raw: it rides as a CTE in the events' statement, so recording the batch costs no round trip.
        extra_statements.append(
            (_insert_batch_sql(), [run.id, batch_key, batch_hash, run.last_event_seq + 1, len(events), run.db_now])
        )
    write = _RunWrite(run)
    for event_type, payload in events:
        write.emit(event_type, payload, posted=True)
    write.save(extra_statements=extra_statements)
    return write.events, True
