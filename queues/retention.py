"""Pruning: what has ended and is older than its tenant's retention goes, sessions stay.

- Whole weeks of events go at once: a partition past every tenant's retention, with no run still
  going in it, is detached and dropped (runs.retention).
- The rest goes in small batches, each its own short transaction that skips rows a writer holds:
  ended runs with their events, commands, event batches and runner jobs; finished queue tasks
  with their attempts and read cursors; webhook deliveries that were sent or given up.
- Sessions keep their summary (their last run's status and time, their storage); only the runs
  behind them go.

A tenant's `retention_days` (TenantRetention, in admin) overrides the default (`--older-than`,
AGENTRUN_RETENTION). It lives in queues/ because it reads every app (the layering rule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q

from agentrun.clock import db_now
from agentrun.models import AuthFailure, DeliveryState, WebhookDelivery
from queues.models import TASK_TERMINAL, QueueAttempt, QueueReadCursor, QueueTask, TenantRetention
from runs import retention
from runs.models import RUN_TERMINAL, Run


@dataclass
class Pruned:
    partitions: list[str] = field(default_factory=list)
    partition_events: int = 0
    deleted: retention.Deleted = field(default_factory=retention.Deleted)
    tasks: int = 0
    deliveries: int = 0

    def __bool__(self) -> bool:
        """Whether anything went."""
        return bool(self.partitions or self.deleted.runs or self.deleted.events or self.tasks or self.deliveries)

    def __str__(self) -> str:
        d = self.deleted
        return (
            f"dropped {len(self.partitions)} event partition(s) ({self.partition_events} events); "
            f"deleted {d.runs} run(s), {d.events} event(s), {d.commands} command(s), {d.runner_jobs} runner job(s), "
            f"{self.tasks} queue task(s), {self.deliveries} webhook deliveries"
        )


def cutoffs(*, older_than: timedelta, now: datetime) -> tuple[datetime, dict[str, datetime]]:
    """The default cutoff and each tenant's own (from its retention_days)."""
    own = {
        tenant: now - timedelta(days=days)
        for tenant, days in TenantRetention.objects.values_list("tenant_id", "retention_days")
    }
    return now - older_than, own


def _scopes(default: datetime, own: dict[str, datetime]):
    """(tenant or None for every other tenant, cutoff, tenants to leave out)."""
    for tenant, cutoff in sorted(own.items()):
        yield tenant, cutoff, ()
    yield None, default, tuple(own)


def prune(
    *,
    older_than: timedelta,
    dry_run: bool = False,
    batch: int = 500,
    pause: float = 0.0,
    now: datetime | None = None,
) -> Pruned:
    """Prune everything older than its cutoff; with `dry_run`, count what would go. `pause`
    seconds between transactions leave the database to the writers."""
    now = now or db_now()
    default, own = cutoffs(older_than=older_than, now=now)
    done = Pruned()
    # Only weeks past every tenant's retention go whole.
    earliest = min([default, *own.values()])
    for partition in retention.droppable_partitions(cutoff=earliest):
        done.partitions.append(partition.name)
        if not dry_run:
            done.partition_events += retention.drop_partition(partition)
    for tenant, cutoff, others in _scopes(default, own):
        if dry_run:
            runs = Run.objects.filter(status__in=RUN_TERMINAL, created_at__lt=cutoff)
            tasks = QueueTask.objects.filter(state__in=TASK_TERMINAL, updated_at__lt=cutoff)
            if tenant is not None:
                runs, tasks = runs.filter(tenant_id=tenant), tasks.filter(tenant_id=tenant)
            else:
                runs, tasks = runs.exclude(tenant_id__in=others), tasks.exclude(tenant_id__in=others)
            done.deleted.runs += runs.count()
            done.tasks += tasks.count()
            continue
        while True:
            ids = retention.ended_run_ids(before=cutoff, tenant_id=tenant, exclude_tenants=others, limit=batch)
            if not ids:
                break
            deleted = retention.delete_runs(ids, pause=pause)
            done.deleted.add(deleted)
            if not deleted.runs:
                break  # every one of them is held by a writer now: next time
            if pause:
                time.sleep(pause)
        while True:
            count = _delete_tasks(before=cutoff, tenant_id=tenant, exclude_tenants=others, limit=batch)
            done.tasks += count
            if count < batch:
                break
            if pause:
                time.sleep(pause)
    if not dry_run:
        done.deliveries = _delete_deliveries(before=earliest, limit=batch * 10)
        # Failed-lookup windows a day over are of no use to the limiter.
        AuthFailure.objects.filter(window_started_at__lt=now - timedelta(days=1)).delete()
    return done


def _delete_tasks(*, before: datetime, tenant_id: str | None, exclude_tenants, limit: int) -> int:
    with transaction.atomic():
        tasks = QueueTask.objects.select_for_update(skip_locked=True).filter(
            state__in=TASK_TERMINAL, updated_at__lt=before
        )
        if tenant_id is not None:
            tasks = tasks.filter(tenant_id=tenant_id)
        elif exclude_tenants:
            tasks = tasks.exclude(tenant_id__in=list(exclude_tenants))
        ids = list(tasks.order_by("updated_at").values_list("pk", flat=True)[:limit])
        if not ids:
            return 0
        QueueReadCursor.objects.filter(task_id__in=ids).delete()
        QueueAttempt.objects.filter(task_id__in=ids).delete()
        QueueTask.objects.filter(pk__in=ids).delete()
    return len(ids)


def _delete_deliveries(*, before: datetime, limit: int) -> int:
    done = Q(state=DeliveryState.DELIVERED) | Q(state=DeliveryState.FAILED)
    ids = list(
        WebhookDelivery.objects.filter(done, created_at__lt=before)
        .order_by("created_at")
        .values_list("pk", flat=True)[:limit]
    )
    if not ids:
        return 0
    deleted, _ = WebhookDelivery.objects.filter(pk__in=ids).delete()
    return deleted


def maintain(*, older_than: timedelta | None, batch: int = 500, pause: float = 0.05) -> tuple[list[str], Pruned | None]:
    """The worker's pass: make the weeks ahead, then prune (unless retention is off)."""
    made = retention.ensure_partitions(now=db_now())
    if older_than is None:
        return made, None
    return made, prune(older_than=older_than, batch=batch, pause=pause)
