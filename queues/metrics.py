"""/metrics: the process instruments (agentrun.metrics) and what the database knows, read at each
scrape so every server process answers the same: runs by status, queue depth, running attempts
and the oldest ready task's age per queue, lapsed leases, and the worker's tallies (reaps,
reconciler actions, GC results, launcher failures). It lives in queues/ because it reads every
app (the layering rule)."""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce, Greatest
from django.views.decorators.csrf import csrf_exempt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentrun import metrics, tallies
from agentrun.clock import db_now
from queues.models import QueueAttempt, QueueTask, TaskState
from runs.models import Run, RunStatus
from sessions.services import StorageOutcome

# The worker's tallies as counters: metric -> (name, help, label name, the label values always
# shown, at 0 until they happen).
TALLIES = {
    tallies.REAPS: (
        "agentrun_reaps",
        "Runs the reaper finished, by reason (runner-lost: a lapsed lease).",
        "reason",
        ("runner-lost", "timeout"),
    ),
    tallies.RECONCILER_ACTIONS: (
        "agentrun_reconciler_actions",
        "What the Kubernetes reconciler did, by action.",
        "action",
        ("fail-run", "delete-job", "delete-policy"),
    ),
    tallies.GC_RESULTS: (
        "agentrun_gc_results",
        "Expired session storage collected, by outcome.",
        "outcome",
        (StorageOutcome.DELETED, StorageOutcome.ABSENT, StorageOutcome.FAILED, StorageOutcome.SKIPPED),
    ),
    tallies.WEBHOOK_DELIVERIES: (
        "agentrun_webhook_tries",
        "Webhook tries, by outcome (retry: it failed and will be tried again; failed: it gave up).",
        "outcome",
        ("delivered", "retry", "failed"),
    ),
    tallies.LAUNCHER_FAILURES: (
        "agentrun_launcher_failures",
        "Runner launches that failed, by launcher.",
        "launcher",
        (),
    ),
}


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        now = db_now()
        runs = GaugeMetricFamily("agentrun_runs", "Runs by status.", labels=["status"])
        counts = dict(Run.objects.order_by().values_list("status").annotate(n=Count("id")))
        for status in RunStatus.values:
            runs.add_metric([status], counts.get(status, 0))
        yield runs

        lapsed = Run.objects.filter(status=RunStatus.CLAIMED, lease_expires_at__lt=now).count()
        yield GaugeMetricFamily(
            "agentrun_leases_lapsed", "Claimed runs whose lease has lapsed (the reaper's next work).", value=lapsed
        )

        depth = GaugeMetricFamily("agentrun_queue_depth", "Pending queue tasks.", labels=["tenant", "queue"])
        lag = GaugeMetricFamily(
            "agentrun_queue_oldest_ready_seconds",
            "Age of the oldest pending task that is ready to dispatch (dispatcher lag).",
            labels=["tenant", "queue"],
        )
        ready = Q(not_before__isnull=True) | Q(not_before__lte=now)
        pending = (
            QueueTask.objects.filter(state=TaskState.PENDING)
            .order_by()
            .values_list("tenant_id", "queue")
            .annotate(
                n=Count("id"),
                oldest=Min(Greatest("created_at", Coalesce("not_before", "created_at")), filter=ready),
            )
        )
        for tenant, queue, n, oldest in pending:
            depth.add_metric([tenant, queue], n)
            lag.add_metric([tenant, queue], max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield depth
        yield lag

        running = GaugeMetricFamily(
            "agentrun_queue_attempts_running", "Queue attempts running.", labels=["tenant", "queue"]
        )
        for tenant, queue, n in (
            QueueAttempt.objects.filter(state=TaskState.RUNNING)
            .order_by()
            .values_list("task__tenant_id", "task__queue")
            .annotate(n=Count("id"))
        ):
            running.add_metric([tenant, queue], n)
        yield running

        totals = tallies.read()
        for metric, (name, documentation, label, shown) in TALLIES.items():
            family = CounterMetricFamily(name, documentation, labels=[label])
            for value, n in sorted({**dict.fromkeys(shown, 0), **totals.get(metric, {})}.items()):
                family.add_metric([value], n)
            yield family


@csrf_exempt
def metrics_view(request):
    """GET /metrics (the Prometheus text format)."""
    return metrics.metrics_response(request, [DatabaseCollector()])
