"""The reaper (SPEC §7): a run whose lease lapsed more than the grace period ago is finished as
failed with `runner-lost`; a run claimed for longer than its `executionPolicy.timeoutSeconds`
is finished with `timeout`. Both bump the lease epoch, so a runner that comes back is fenced
out. A queue task behind the run then follows its policy (a retry is a new run)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import FloatField
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast

from agentrun import tallies
from agentrun.clock import db_now
from runs import services
from runs.models import Run, RunStatus


@dataclass(frozen=True)
class Reaped:
    run_id: str
    reason: str  # runner-lost or timeout
    detail: str


def due(*, limit: int = 500) -> list[Reaped]:
    now = db_now()
    grace = timedelta(seconds=settings.AGENTRUN_REAP_GRACE_SECONDS)
    found = [
        Reaped(
            run.id,
            "runner-lost",
            f"runner {run.claimed_by} stopped renewing its lease (lapsed {run.lease_expires_at.isoformat()})",
        )
        for run in Run.objects.filter(status=RunStatus.CLAIMED, lease_expires_at__lt=now - grace).order_by(
            "lease_expires_at"
        )[:limit]
        if run.lease_expires_at is not None  # never None, by the filter; this tells the type checker
    ]
    timed = (
        Run.objects.filter(
            status__in=[RunStatus.PENDING, RunStatus.CLAIMED],
            claimed_at__isnull=False,
            execution_policy__has_key="timeoutSeconds",
        )
        .annotate(timeout=Cast(KeyTextTransform("timeoutSeconds", "execution_policy"), FloatField()))
        .filter(timeout__isnull=False)
    )
    lost = {item.run_id for item in found}
    for run in timed.order_by("claimed_at")[:limit]:
        if run.id in lost or run.claimed_at is None:  # never None, by the filter; this tells the type checker
            continue
        if run.claimed_at + timedelta(seconds=run.timeout) < now:
            found.append(Reaped(run.id, "timeout", f"claimed for more than {run.timeout:g} s"))
    return found


def reap(*, dry_run: bool = False, limit: int = 500) -> list[Reaped]:
    """Finish every run that is due; with `dry_run`, only say which."""
    done = []
    for item in due(limit=limit):
        if dry_run:
            done.append(item)
            continue
        status = "timeout" if item.reason == "timeout" else "failed"
        if (
            services.run_expire(
                run_id=item.run_id, terminal_status=status, failure_kind=item.reason, message=item.detail
            )
            is not None
        ):
            done.append(item)
    if not dry_run:
        tallies.add(tallies.REAPS, [item.reason for item in done])
    return done
