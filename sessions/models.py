"""Agent sessions: a conversation that outlives its runs, with its storage and read state."""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now


class ExecutionState(models.TextChoices):
    IDLE = "idle"
    RUNNING = "running"
    TERMINAL = "terminal"


class StorageKind(models.TextChoices):
    NONE = "none"
    PVC = "pvc"
    EVICTED = "evicted"


class Session(models.Model):
    session_id = models.CharField(max_length=200, primary_key=True, db_collation="C")
    tenant_id = models.CharField(max_length=200)
    project_id = models.CharField(max_length=200)
    backend_profile = models.CharField(max_length=32)
    conversation_id = models.CharField(max_length=500, null=True, blank=True)
    thread_id = models.CharField(max_length=500, null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    version = models.BigIntegerField()
    execution_state = models.CharField(max_length=16, choices=ExecutionState.choices, default=ExecutionState.IDLE)
    last_run_id = models.CharField(max_length=64, null=True, blank=True)
    last_command_id = models.CharField(max_length=64, null=True, blank=True)
    active_run_id = models.CharField(max_length=64, null=True, blank=True)
    active_command_id = models.CharField(max_length=64, null=True, blank=True)
    last_event_seq = models.BigIntegerField(default=0)
    terminal_status = models.CharField(max_length=32, null=True, blank=True)
    failure_kind = models.CharField(max_length=64, null=True, blank=True)
    title = models.CharField(max_length=200, null=True, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    last_activity_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    storage_kind = models.CharField(max_length=16, choices=StorageKind.choices, default=StorageKind.NONE)
    storage_pvc_name = models.CharField(max_length=253, null=True, blank=True)
    storage_namespace = models.CharField(max_length=253, null=True, blank=True)
    storage_pvc_phase = models.CharField(max_length=64, null=True, blank=True)
    storage_sha256 = models.CharField(max_length=64, null=True, blank=True)
    storage_size_bytes = models.BigIntegerField(null=True, blank=True)
    storage_files_count = models.BigIntegerField(null=True, blank=True)
    storage_updated_at = models.DateTimeField(null=True, blank=True)
    storage_evicted_at = models.DateTimeField(null=True, blank=True)
    codex_rollout_subdir = models.CharField(max_length=500, null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant_id", "project_id", "version"], name="session_scope_version"),
            models.Index(fields=["backend_profile"], name="session_backend"),
            models.Index(
                fields=["updated_at"],
                name="session_gc",
                condition=models.Q(storage_kind="pvc", expires_at__isnull=False) & ~models.Q(storage_pvc_name=""),
            ),
        ]
        constraints = [models.UniqueConstraint(fields=["version"], name="session_version_unique")]

    def __str__(self) -> str:
        return self.session_id

    @property
    def active(self) -> bool:
        # SPEC §7 A13: active means a turn is open; a claim alone does not make a session active.
        return self.execution_state == ExecutionState.RUNNING
