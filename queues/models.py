"""Queue tasks (work a producer puts in a queue), their attempts (one run each), read cursors,
and the operators' knobs: per-queue and per-tenant concurrency limits and the pause switch."""

from __future__ import annotations

from django.db import models


class TaskState(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"


TASK_TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.BLOCKED, TaskState.CANCELLED)
TASK_ACTIVE = (TaskState.PENDING, TaskState.RUNNING)


class QueueTask(models.Model):
    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    tenant_id = models.CharField(max_length=200)
    project_id = models.CharField(max_length=200)
    queue = models.CharField(max_length=200)
    lane = models.CharField(max_length=200)
    title = models.CharField(max_length=500)
    priority = models.IntegerField(default=0)
    backend_profile = models.CharField(max_length=32)
    provider_id = models.CharField(max_length=200, null=True, blank=True)
    workspace_ref = models.JSONField(null=True, blank=True)
    session_ref = models.JSONField(null=True, blank=True)
    execution_policy = models.JSONField(null=True, blank=True)
    resource_bundle_ref = models.JSONField(null=True, blank=True)
    payload = models.JSONField(null=True, blank=True)
    references = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    # Where a signed POST goes on each terminal state (webhooks/), or None.
    webhook_url = models.TextField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.PENDING)
    version = models.BigIntegerField()
    payload_hash = models.CharField(max_length=64)
    latest_attempt = models.JSONField(null=True, blank=True)
    session_path = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    cancelled_at = models.DateTimeField(null=True, blank=True)
    cancel_reason = models.TextField(null=True, blank=True)
    # The dispatcher's bookkeeping: attempts made, and when a retry may start (backoff).
    attempt_count = models.IntegerField(default=0)
    not_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant_id", "version"], name="task_tenant_version"),
            models.Index(fields=["tenant_id", "project_id", "version"], name="task_scope_version"),
            models.Index(fields=["queue", "state", "version"], name="task_queue_state_version"),
            models.Index(
                fields=["tenant_id", "project_id", "-priority", "created_at", "id"], name="task_scope_priority"
            ),
            # What the dispatcher scans: pending tasks in dispatch order.
            models.Index(
                fields=["-priority", "created_at", "id"], name="task_pending_order", condition=models.Q(state="pending")
            ),
            # What counts against the concurrency limits.
            models.Index(fields=["tenant_id", "queue"], name="task_running", condition=models.Q(state="running")),
        ]
        constraints = [
            models.UniqueConstraint(fields=["version"], name="task_version_unique"),
            models.UniqueConstraint(
                fields=["tenant_id", "project_id", "idempotency_key"],
                name="task_idempotency_key",
                condition=models.Q(idempotency_key__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return self.id

    @property
    def is_terminal(self) -> bool:
        return self.state in TASK_TERMINAL


class QueueAttempt(models.Model):
    """One try at a task: the run the dispatcher created and its first turn."""

    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    task = models.ForeignKey(QueueTask, on_delete=models.CASCADE, related_name="attempts")
    number = models.IntegerField()
    run_id = models.CharField(max_length=64, null=True, blank=True, db_collation="C")
    command_id = models.CharField(max_length=64, null=True, blank=True)
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.RUNNING)
    failure_kind = models.CharField(max_length=64, null=True, blank=True)
    failure_message = models.TextField(null=True, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task", "number"], name="attempt_task_number")]
        indexes = [models.Index(fields=["run_id"], name="attempt_open_run", condition=models.Q(state="running"))]

    def __str__(self) -> str:
        return f"{self.task_id}#{self.number}"


class QueueReadCursor(models.Model):
    pk = models.CompositePrimaryKey("task", "reader_id")
    task = models.ForeignKey(QueueTask, on_delete=models.CASCADE, related_name="read_cursors")
    reader_id = models.CharField(max_length=200, db_collation="C")
    task_version = models.BigIntegerField()
    read_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.task_id} read by {self.reader_id}"


class Queue(models.Model):
    """A tenant's queue, as operators tune it. A queue without a row has no limit and runs."""

    tenant_id = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    max_running = models.PositiveIntegerField(
        null=True, blank=True, help_text="Running attempts at most; empty: no limit."
    )
    paused = models.BooleanField(default=False, help_text="A paused queue dispatches nothing.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant_id", "name"], name="queue_tenant_name")]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"


class TenantLimit(models.Model):
    tenant_id = models.CharField(max_length=200, primary_key=True)
    max_running = models.PositiveIntegerField(help_text="Running attempts at most, over all the tenant's queues.")

    def __str__(self) -> str:
        return self.tenant_id


class TenantRetention(models.Model):
    """How long a tenant's ended runs and finished tasks are kept, over the default
    (AGENTRUN_RETENTION, `prune --older-than`); queues.retention prunes by it."""

    tenant_id = models.CharField(max_length=200, primary_key=True)
    retention_days = models.PositiveIntegerField(
        help_text="Days an ended run (its events, commands, runner jobs) or a finished task is kept."
    )

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.retention_days} days"
