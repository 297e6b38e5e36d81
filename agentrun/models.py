"""What every app shares: API keys and the version counters."""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now
from django.utils import timezone


class Role(models.TextChoices):
    CLIENT = "client"
    RUNNER = "runner"
    OPERATOR = "operator"


class ApiKey(models.Model):
    """A bearer key. Only the SHA-256 of the key is stored; the key is shown once, at creation."""

    prefix = models.CharField(max_length=16, help_text="The key's first characters, to tell keys apart.")
    key_hash = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200, blank=True, default="")
    tenant_id = models.CharField(max_length=200)
    project_id = models.CharField(max_length=200, null=True, blank=True)
    role = models.CharField(max_length=16, choices=Role.choices)
    run_id = models.CharField(
        max_length=64, null=True, blank=True, help_text="A runner key scoped to one run sees only that run."
    )
    created_at = models.DateTimeField(db_default=Now())
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="The key stops working at this time.")
    last_used_at = models.DateTimeField(
        null=True, blank=True, help_text="When a request last used the key (kept to the minute)."
    )

    class Meta:
        verbose_name = "API key"
        indexes = [models.Index(fields=["tenant_id", "role"])]

    def __str__(self) -> str:
        scope = self.tenant_id + (f"/{self.project_id}" if self.project_id else "")
        return f"{self.prefix}… ({self.role} @ {scope})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())


class Counter(models.Model):
    """One row per domain (sessions, queue). Versions are taken with UPDATE … RETURNING, which
    holds the row lock until commit, so version order is commit order and a follower of a
    version cursor never skips a change that commits late."""

    name = models.CharField(max_length=32, primary_key=True)
    value = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


class Tally(models.Model):
    """A running total the worker keeps for /metrics (reaps, reconciler actions, GC results,
    launcher failures), one row per metric and label. Kept in the database, not in a process,
    so the API's /metrics reports the worker's figures wherever the worker runs, across its
    restarts."""

    metric = models.CharField(max_length=64)
    label = models.CharField(max_length=200, default="")
    value = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["metric", "label"], name="agentrun_tally_metric_label")]

    def __str__(self) -> str:
        return f"{self.metric}{{{self.label}}}={self.value}"


class AuthFailure(models.Model):
    """Failed key lookups from one client address in the current window (agentrun.auth's limiter).
    Kept in the database so every server process and replica counts the same failures."""

    address = models.CharField(max_length=64, primary_key=True)
    window_started_at = models.DateTimeField()
    failures = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.address}: {self.failures}"


class WebhookSecret(models.Model):
    """A tenant's webhook signing secret (`manage.py webhook_secret`). Kept as is: the HMAC needs it."""

    tenant_id = models.CharField(max_length=200, primary_key=True)
    secret = models.CharField(max_length=128)
    created_at = models.DateTimeField(db_default=Now())
    rotated_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"webhook secret of {self.tenant_id}"


class DeliveryState(models.TextChoices):
    PENDING = "pending"  # waiting for its next try
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # every try failed; an operator may resend it


class WebhookDelivery(models.Model):
    """One webhook to send: written in the transaction that ended its run or queue task (an
    outbox), sent by the worker, re-sendable in admin. The body is kept as the bytes sent, so a
    resend is the same document, signed anew."""

    id = models.CharField(max_length=64, primary_key=True, db_collation="C")
    tenant_id = models.CharField(max_length=200)
    url = models.TextField()
    event_type = models.CharField(max_length=64)
    body = models.TextField()
    run_id = models.CharField(max_length=64, null=True, blank=True, db_collation="C")
    task_id = models.CharField(max_length=64, null=True, blank=True, db_collation="C")
    state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    attempts = models.IntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(
                fields=["next_attempt_at"], name="webhook_due", condition=models.Q(state=DeliveryState.PENDING)
            ),
            models.Index(fields=["run_id"], name="webhook_run"),
            models.Index(fields=["task_id"], name="webhook_task"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.url} ({self.state})"
