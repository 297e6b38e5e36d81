"""Agent sessions: a conversation that outlives its runs, with its storage and read state."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Coalesce, Greatest


class ExecutionState(models.TextChoices):
    IDLE = "idle"
    RUNNING = "running"
    TERMINAL = "terminal"


class StorageKind(models.TextChoices):
    NONE = "none"
    PVC = "pvc"
    EVICTED = "evicted"


RUNNING = Q(execution_state=ExecutionState.RUNNING)
# Last activity (or the update time when there was none) newest first, then update time, then id.
INBOX_ORDER = (Coalesce("last_activity_at", "updated_at").desc(), F("updated_at").desc(), F("session_id").asc())


class Session(models.Model):
    session_id = models.CharField(max_length=255, primary_key=True, db_collation="C")
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
    # The session counter's value at the last write that moved the session in the inbox without
    # bumping its version (activity: events, claims, a new run). Taken like a version, in the
    # writing transaction, so it is commit-ordered too (see sessions.services.TOUCH_VERSION).
    activity_version = models.BigIntegerField(default=0, db_default=0)
    # The counter's value at the session's last write of any kind that can move it in the inbox:
    # a walk of the inbox takes every session at or below its edge as unchanged since it began.
    inbox_version = models.GeneratedField(
        expression=Greatest("version", "activity_version"), output_field=models.BigIntegerField(), db_persist=True
    )

    # Not columns: what sessions.selectors sets on the sessions it returns. The reader's cursor
    # (None without one), and, on an inbox page, the session's attention group (main part) or
    # the stamp of its last change (tail).
    cursor_version: int | None
    cursor_read_at: datetime | None
    cursor_read_version: int | None
    attention_group: int
    changed_version: int

    class Meta:
        indexes = [
            # The change feed (version order) and its watermark, per tenant and per project.
            models.Index(fields=["tenant_id", "version"], name="session_tenant_version"),
            models.Index(fields=["tenant_id", "project_id", "version"], name="session_scope_version"),
            # The inbox order (SPEC §4.4) inside each attention group; running sessions have
            # their own partial indexes so the active group never scans the idle ones.
            *(
                models.Index(*scope, *INBOX_ORDER, name=name, condition=condition)
                for scope, name, condition in (
                    ((F("tenant_id"),), "session_inbox", None),
                    ((F("tenant_id"), F("project_id")), "session_inbox_project", None),
                    ((F("tenant_id"),), "session_inbox_running", RUNNING),
                    ((F("tenant_id"), F("project_id")), "session_inbox_project_running", RUNNING),
                )
            ),
            # Sessions changed since a walk of the inbox began (its tail, see selectors).
            models.Index(fields=["tenant_id", "inbox_version"], name="session_tenant_inbox_version"),
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


class SessionReadCursor(models.Model):
    """How far one reader has read a session: the session's version when they last read it."""

    pk = models.CompositePrimaryKey("session", "reader_id")
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="read_cursors")
    reader_id = models.CharField(max_length=200, db_collation="C")
    session_version = models.BigIntegerField()
    read_at = models.DateTimeField()
    # The session counter's value when the cursor was last written: a read moves the session
    # (unread to read) for this reader only, and a walk of their inbox must see that it came
    # after the walk began, as it sees a session's own changes.
    read_version = models.BigIntegerField(default=0, db_default=0)

    class Meta:
        # The cursors a reader wrote since a walk of their inbox began (its tail).
        indexes = [models.Index(fields=["reader_id", "read_version"], name="session_read_reader_version")]

    def __str__(self) -> str:
        return f"{self.session_id} read by {self.reader_id}"
