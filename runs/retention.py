"""Retention of runs: the event table's partitions, and deleting ended runs in small batches.

Events live in `runs_runevent`, partitioned by range of `run_created_at` (the creation time of
their run, copied onto each event): one partition per UTC week from Monday
(`runs_runevent_pYYYYMMDD`, the Monday), one for everything before partitioning
(`runs_runevent_before`) and a default one for an event whose week has no partition yet. Weeks,
not days: a read by run (most are) looks in every partition, so there are few of them.
`ensure_partitions` creates the weeks ahead (the worker calls it); `droppable_partitions` and
`drop_partition` let a prune drop a whole week at once, which costs
the same for one event as for a million; `delete_runs` deletes the rest in batches, each its own
short transaction, so no hot table is locked for long.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from psycopg import sql

from agentrun.sqlnames import column, table
from runs.models import RUN_TERMINAL, Command, EventBatch, Run, RunEvent, RunnerJob

logger = logging.getLogger(__name__)

WEEKS_AHEAD = 2
# A partition's bounds, as pg_get_expr renders them.
_BOUNDS = re.compile(r"FOR VALUES FROM \((?P<lower>[^)]*)\) TO \((?P<upper>[^)]*)\)")


@dataclass(frozen=True)
class Partition:
    name: str
    lower: datetime | None  # None: MINVALUE
    upper: datetime


def week_start(at: datetime) -> datetime:
    """The Monday 00:00 UTC of `at`'s week."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def _timestamp(text: str) -> datetime | None:
    text = text.strip().strip("'")
    if text.upper() == "MINVALUE":
        return None
    return datetime.fromisoformat(text)


def partitions() -> list[Partition]:
    """The event table's range partitions, oldest first (the default partition is not listed)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
            [RunEvent._meta.db_table],
        )
        rows = cursor.fetchall()
    found = []
    for name, bound in rows:
        match = _BOUNDS.search(bound or "")
        if match is None:
            continue  # DEFAULT
        upper = _timestamp(match.group("upper"))
        if upper is not None:
            found.append(Partition(name, _timestamp(match.group("lower")), upper))
    return sorted(found, key=lambda partition: partition.upper)


def ensure_partitions(*, now: datetime, weeks_ahead: int = WEEKS_AHEAD) -> list[str]:
    """Create the weekly partitions from this week to `weeks_ahead` weeks on; returns those
    made. A week whose events already went to the default partition is left there (logged)."""
    existing = {partition.name for partition in partitions()}
    made = []
    monday = week_start(now)
    for offset in range(weeks_ahead + 1):
        week = monday + timedelta(weeks=offset)
        name = f"{RunEvent._meta.db_table}_p{week:%Y%m%d}"
        if name in existing:
            continue
        statement = sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(name),
            sql.Identifier(RunEvent._meta.db_table),
            sql.Literal(week.isoformat()),
            sql.Literal((week + timedelta(weeks=1)).isoformat()),
        )
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '5s'")
                cursor.execute(statement)
        except Exception as exc:  # noqa: BLE001 - a week that cannot be made is logged, the others go on
            logger.warning("could not create event partition %s: %s", name, exc)
            continue
        made.append(name)
    return made


def active_runs_between(lower: datetime | None, upper: datetime) -> bool:
    runs = Run.objects.exclude(status__in=RUN_TERMINAL).filter(created_at__lt=upper)
    if lower is not None:
        runs = runs.filter(created_at__gte=lower)
    return runs.exists()


def droppable_partitions(*, cutoff: datetime) -> list[Partition]:
    """Partitions that end at or before `cutoff` and hold no event of a run still going."""
    return [
        partition
        for partition in partitions()
        if partition.upper <= cutoff and not active_runs_between(partition.lower, partition.upper)
    ]


def drop_partition(partition: Partition) -> int:
    """Detach and drop a whole partition (its events at once); returns how many events it held.
    The parent's lock is taken for a moment only, and given up (to retry next time) rather than
    waited on behind a long transaction."""
    name = sql.Identifier(partition.name)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '2s'")
        # A table with deferred checks still queued cannot be dropped: run them now (they hold
        # already, or the caller's transaction would fail at its commit anyway).
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(name))
        count = cursor.fetchone()[0]
        cursor.execute(
            sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier(RunEvent._meta.db_table), name)
        )
        cursor.execute(sql.SQL("DROP TABLE {}").format(name))
    return count


def ended_run_ids(*, before: datetime, tenant_id: str | None = None, exclude_tenants=(), limit: int) -> list[str]:
    runs = Run.objects.filter(status__in=RUN_TERMINAL, created_at__lt=before)
    if tenant_id is not None:
        runs = runs.filter(tenant_id=tenant_id)
    if exclude_tenants:
        runs = runs.exclude(tenant_id__in=list(exclude_tenants))
    return list(runs.order_by("created_at").values_list("id", flat=True)[:limit])


@dataclass
class Deleted:
    runs: int = 0
    events: int = 0
    commands: int = 0
    runner_jobs: int = 0
    batches: int = 0

    def add(self, other: Deleted) -> None:
        self.runs += other.runs
        self.events += other.events
        self.commands += other.commands
        self.runner_jobs += other.runner_jobs
        self.batches += other.batches


EVENTS_PER_TRANSACTION = 10_000


def delete_runs(run_ids: list[str], *, max_events: int = EVENTS_PER_TRANSACTION, pause: float = 0.0) -> Deleted:
    """Delete these runs (they must have ended) with their events, commands, event batches and
    runner jobs, in transactions of at most about `max_events` events each: runs are grouped up
    to that many, and a run with more has its events deleted in seq ranges of that size first.
    `pause` seconds between transactions leave the database to the writers. A run that is not
    ended (any more) is skipped."""
    done = Deleted()
    rows = list(
        Run.objects.filter(pk__in=run_ids, status__in=RUN_TERMINAL)
        .order_by("pk")
        .values_list("pk", "created_at", "last_event_seq")
    )
    group: list[str] = []
    weight = 0
    for run_id, created_at, last_seq in rows:
        if last_seq > max_events:
            for start in range(0, last_seq, max_events):
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(
                        sql.SQL("DELETE FROM {} WHERE {} = %s AND {} = %s AND {} > %s AND {} <= %s").format(
                            table(RunEvent),
                            column(RunEvent, "run"),
                            column(RunEvent, "run_created_at"),
                            column(RunEvent, "seq"),
                            column(RunEvent, "seq"),
                        ),
                        [run_id, created_at, start, start + max_events],
                    )
                    done.events += cursor.rowcount
                time.sleep(pause)
            last_seq = 0
        if group and weight + last_seq > max_events:
            done.add(_delete_group(group))
            time.sleep(pause)
            group, weight = [], 0
        group.append(run_id)
        weight += last_seq
    if group:
        done.add(_delete_group(group))
    return done


def _delete_group(run_ids: list[str]) -> Deleted:
    done = Deleted()
    with transaction.atomic():
        # Locked in id order, skipping any a writer holds (it is taken next time).
        ids = list(
            Run.objects.select_for_update(skip_locked=True)
            .filter(pk__in=run_ids, status__in=RUN_TERMINAL)
            .order_by("pk")
            .values_list("pk", "created_at")
        )
        if not ids:
            return done
        keys = [pk for pk, _ in ids]
        created = sorted({at for _, at in ids})
        # The run's creation time lets PostgreSQL look in its events' partition only.
        done.events = _delete(RunEvent, "run", keys, also=("run_created_at", created))
        done.commands = _delete(Command, "run", keys)
        done.batches = _delete(EventBatch, "run", keys)
        done.runner_jobs = _delete(RunnerJob, "run", keys)
        done.runs = _delete(Run, "id", keys)
    return done


def _delete(model, field: str, values: list, *, also: tuple[str, list] | None = None) -> int:
    """DELETE … WHERE field = ANY(values): raw, as the ORM's delete would load every row to
    cascade in Python (a run's thousands of events)."""
    statement = sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(table(model), column(model, field))
    params: list = [values]
    if also is not None:
        statement = sql.SQL("{} AND {} = ANY(%s)").format(statement, column(model, also[0]))
        params.append(also[1])
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount
