"""Runs, their commands and events, runners and runner jobs."""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import models

from runs.validation import bundle_problems


class RunStatus(models.TextChoices):
    PENDING = "pending"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"


RUN_ACTIVE = (RunStatus.PENDING, RunStatus.CLAIMED)
RUN_TERMINAL = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.BLOCKED, RunStatus.CANCELLED)


class CommandState(models.TextChoices):
    PENDING = "pending"
    ACKNOWLEDGED = "acknowledged"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


COMMAND_OPEN = (CommandState.PENDING, CommandState.ACKNOWLEDGED)
COMMAND_TERMINAL = (CommandState.COMPLETED, CommandState.FAILED, CommandState.CANCELLED)


class Run(models.Model):
    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    tenant_id = models.CharField(max_length=200)
    project_id = models.CharField(max_length=200)
    backend_profile = models.CharField(max_length=32)
    session_ref = models.JSONField(null=True, blank=True)
    # The session the run belongs to (its sessionRef's id), for the session's trace and runs.
    session_id = models.CharField(max_length=255, null=True, blank=True, db_collation="C")
    resource_bundle_ref = models.JSONField(null=True, blank=True)
    # The name of the operator's resource bundle the run starts with (its ref's, else the
    # tenant's default at create), or None.
    resource_bundle = models.CharField(max_length=200, null=True, blank=True, db_collation="C")
    provider_id = models.CharField(max_length=200, null=True, blank=True)
    workspace_ref = models.JSONField(null=True, blank=True)
    execution_policy = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    # Other create-input fields, copied verbatim (SPEC §1.1).
    extra = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    payload_hash = models.CharField(max_length=64)
    # Where a signed POST goes on each terminal status (webhooks/), or None.
    webhook_url = models.TextField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    terminal_status = models.CharField(max_length=32, null=True, blank=True)
    failure_kind = models.CharField(max_length=64, null=True, blank=True)
    failure_message = models.TextField(null=True, blank=True)
    claimed_by = models.CharField(max_length=200, null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Fencing token: every claim (and the reaper) bumps it; runner writes must carry the current one.
    lease_epoch = models.BigIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    # The last seq handed out, allocated under the run's row lock.
    last_event_seq = models.BigIntegerField(default=0)
    last_command_seq = models.BigIntegerField(default=0)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    # Not a column: the database clock of the transaction that locked the row, which the runs
    # services' lock annotates for the writes that follow it.
    db_now: datetime

    class Meta:
        indexes = [
            models.Index(fields=["tenant_id", "project_id", "created_at"], name="run_scope_created"),
            models.Index(fields=["session_id", "created_at"], name="run_session_created"),
            # What the worker's launch pass looks at: runs waiting for a runner.
            models.Index(fields=["created_at"], name="run_pending_created", condition=models.Q(status="pending")),
            models.Index(
                fields=["lease_expires_at"], name="run_active_lease", condition=models.Q(status__in=RUN_ACTIVE)
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant_id", "project_id", "idempotency_key"],
                name="run_idempotency_key",
                condition=models.Q(idempotency_key__isnull=False),
            )
        ]

    def __str__(self) -> str:
        return self.id

    @property
    def is_terminal(self) -> bool:
        return self.status in RUN_TERMINAL


class Command(models.Model):
    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="commands")
    seq = models.BigIntegerField()
    type = models.CharField(max_length=32)
    payload = models.JSONField(default=dict)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    payload_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=CommandState.choices, default=CommandState.PENDING)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    terminal_status = models.CharField(max_length=32, null=True, blank=True)
    failure_kind = models.CharField(max_length=64, null=True, blank=True)
    failure_message = models.TextField(null=True, blank=True)
    thread_id = models.CharField(max_length=500, null=True, blank=True)
    turn_id = models.CharField(max_length=500, null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="command_run_seq"),
            models.UniqueConstraint(
                fields=["run", "idempotency_key"],
                name="command_idempotency_key",
                condition=models.Q(idempotency_key__isnull=False),
            ),
        ]
        indexes = [models.Index(fields=["run", "state"], name="command_run_state")]

    def __str__(self) -> str:
        return self.id

    @property
    def is_terminal(self) -> bool:
        return self.state in COMMAND_TERMINAL


class RunEvent(models.Model):
    """Append-only: written by services in the transaction of the change they describe.

    The table is partitioned by range of `run_created_at`, the creation time of the event's run
    (migration 0007, runs.retention): a partition per UTC day. In the database the primary key
    is (id, run_created_at) and (run_id, seq, run_created_at) is unique, which (run_created_at
    being the run's) keeps id and (run, seq) unique; a change to this table is a hand-written
    migration."""

    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.BigIntegerField()
    type = models.CharField(max_length=32)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    run_created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="event_run_seq")]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq}"


class EventBatch(models.Model):
    """A runner's batch key, so a retried batch replays instead of appending twice."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="event_batches")
    batch_key = models.CharField(max_length=200)
    payload_hash = models.CharField(max_length=64)
    first_seq = models.BigIntegerField()
    count = models.IntegerField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "batch_key"], name="event_batch_key")]

    def __str__(self) -> str:
        return f"{self.run_id}/{self.batch_key}"


class ResourceBundle(models.Model):
    """What an operator gives a tenant's runs (SPEC has no such entity; issue-level design in
    README "Resource bundles"): environment from secret references (provider keys, git tokens),
    the runner's image, CPU and memory, an optional runtime class and node selector, and an
    egress allowlist. A run picks one with `resourceBundleRef: {kind: "bundle", name}`, or gets
    its tenant's default. It holds references only: no secret value is stored here."""

    tenant_id = models.CharField(max_length=200)
    name = models.CharField(max_length=200, db_collation="C")
    is_default = models.BooleanField(default=False, help_text="The bundle of the tenant's runs that name none.")
    env = models.JSONField(
        default=list,
        blank=True,
        help_text='Variables from secret keys: [{"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"}].',
    )
    env_from = models.JSONField(
        default=list, blank=True, help_text='Secrets whose every key becomes a variable: ["git-tokens"].'
    )
    image = models.CharField(max_length=1000, blank=True, help_text="The runner image; empty: the default.")
    cpu = models.CharField(max_length=32, blank=True, help_text="A Kubernetes quantity (500m, 2); empty: default.")
    memory = models.CharField(max_length=32, blank=True, help_text="A Kubernetes quantity (1Gi); empty: default.")
    runtime_class_name = models.CharField(max_length=253, blank=True, help_text="gvisor, kata...; empty: none.")
    node_selector = models.JSONField(default=dict, blank=True, help_text='Node labels: {"pool": "agents"}.')
    egress_allowlist = models.JSONField(
        default=list,
        blank=True,
        help_text='Where runners may connect besides agentrun and DNS: ["203.0.113.0/24", "198.51.100.7/32:443"].',
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant_id", "name"], name="resource_bundle_name"),
            models.UniqueConstraint(
                fields=["tenant_id"], name="resource_bundle_default", condition=models.Q(is_default=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"

    def clean(self) -> None:
        problems = bundle_problems(
            name=self.name,
            env=self.env,
            env_from=self.env_from,
            cpu=self.cpu,
            memory=self.memory,
            runtime_class_name=self.runtime_class_name,
            node_selector=self.node_selector,
            egress_allowlist=self.egress_allowlist,
        )
        if problems:
            raise ValidationError(problems)


class Runner(models.Model):
    id = models.CharField(max_length=200, primary_key=True, db_collation="C")
    tenant_id = models.CharField(max_length=200)
    attributes = models.JSONField(default=dict, blank=True)
    registered_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.id


class RunnerJob(models.Model):
    id = models.CharField(max_length=200, primary_key=True, db_collation="C")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="runner_jobs")
    command_id = models.CharField(max_length=64)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    payload_hash = models.CharField(max_length=200)
    attempt_id = models.CharField(max_length=200)
    runner_id = models.CharField(max_length=200)
    namespace = models.CharField(max_length=253)
    job_name = models.CharField(max_length=253)
    manager_url = models.CharField(max_length=2000)
    image = models.CharField(max_length=1000)
    source_commit = models.CharField(max_length=200)
    service_account_name = models.CharField(max_length=253, null=True, blank=True)
    result = models.JSONField(default=dict, blank=True)
    # Set when the launcher stopped the job (or it never started): the worker looks only at the others.
    stopped_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "idempotency_key"],
                name="runner_job_idempotency_key",
                condition=models.Q(idempotency_key__isnull=False),
            )
        ]
        indexes = [
            models.Index(fields=["run", "command_id", "created_at"], name="runner_job_run_command"),
            models.Index(fields=["run"], name="runner_job_unstopped", condition=models.Q(stopped_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return self.id
