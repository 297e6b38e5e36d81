"""The worker's running totals for /metrics (see agentrun.models.Tally)."""

from __future__ import annotations

from collections import Counter as Bag

from django.db import connection
from psycopg import sql

from agentrun.models import Tally
from agentrun.sqlnames import column, table

REAPS = "reaps"  # label: the reason, runner-lost (a lapsed lease) or timeout
RECONCILER_ACTIONS = "reconciler_actions"  # label: fail-run, delete-job or delete-policy
GC_RESULTS = "gc_results"  # label: the storage outcome (deleted, absent, failed, skipped)
LAUNCHER_FAILURES = "launcher_failures"  # label: the launcher (local, kubernetes)
WEBHOOK_DELIVERIES = "webhook_deliveries"  # label: delivered, retry or failed

# Raw: one upsert adding to every row at once; the ORM has no INSERT … ON CONFLICT DO UPDATE
# with an increment.
_ADD = sql.SQL(
    "INSERT INTO {table} ({metric}, {label}, {value}) SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
    "ON CONFLICT ({metric}, {label}) DO UPDATE SET {value} = {table}.{value} + EXCLUDED.{value}"
).format(table=table(Tally), metric=column(Tally, "metric"), label=column(Tally, "label"), value=column(Tally, "value"))


def add(metric: str, labels: Bag[str] | dict[str, int] | list[str]) -> None:
    """Add to `metric`'s totals: a count per label (a list counts each item once)."""
    counts = Bag(labels) if isinstance(labels, list) else labels
    items = sorted((label, n) for label, n in counts.items() if n)
    if not items:
        return
    with connection.cursor() as cursor:
        cursor.execute(_ADD, [[metric] * len(items), [label for label, _ in items], [n for _, n in items]])


def read() -> dict[str, dict[str, int]]:
    """Every total: metric -> label -> value."""
    totals: dict[str, dict[str, int]] = {}
    for metric, label, value in Tally.objects.values_list("metric", "label", "value"):
        totals.setdefault(metric, {})[label] = value
    return totals
