"""Operators watch sessions here: attention, run pointers, storage; mark read; evict storage."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from django.contrib.admin.options import _FieldOpts

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Q
from django.template.response import TemplateResponse

from agentrun import kube
from agentrun.auth import Scope
from agentrun.clock import db_now
from sessions import services
from sessions.models import Session, StorageKind
from sessions.services import StorageOutcome


class ExpiredFilter(admin.SimpleListFilter):
    title = "expired"
    parameter_name = "expired"

    def lookups(self, request, model_admin):
        return (("yes", "Expired"), ("no", "Not expired"))

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(expires_at__lte=db_now())
        if self.value() == "no":
            return queryset.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=db_now()))
        return queryset


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = (
        "session_id",
        "title",
        "tenant_id",
        "project_id",
        "backend_profile",
        "execution_state",
        "storage_kind",
        "expires_at",
        "last_activity_at",
        "version",
    )
    list_filter = ("execution_state", "storage_kind", "backend_profile", "tenant_id", ExpiredFilter)
    search_fields = ("session_id", "title", "thread_id")
    ordering = ("-last_activity_at",)
    actions = ("mark_read", "evict_storage")
    fieldsets: ClassVar[tuple[tuple[str | None, _FieldOpts], ...]] = (
        (
            None,
            {
                "fields": (
                    "session_id",
                    "title",
                    "tenant_id",
                    "project_id",
                    "backend_profile",
                    "conversation_id",
                    "thread_id",
                    "metadata",
                    "summary",
                    "version",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "Execution",
            {
                "fields": (
                    "execution_state",
                    "active_run_id",
                    "active_command_id",
                    "last_run_id",
                    "last_command_id",
                    "last_event_seq",
                    "terminal_status",
                    "failure_kind",
                    "last_activity_at",
                )
            },
        ),
        (
            "Storage",
            {
                "fields": (
                    "storage_kind",
                    "storage_pvc_name",
                    "storage_namespace",
                    "storage_pvc_phase",
                    "storage_size_bytes",
                    "storage_files_count",
                    "storage_sha256",
                    "codex_rollout_subdir",
                    "expires_at",
                    "storage_updated_at",
                    "storage_evicted_at",
                )
            },
        ),
    )
    readonly_fields = [f.name for f in Session._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Mark read for me")
    def mark_read(self, request, queryset):
        reader_id = request.user.get_username()
        for session_id in queryset.values_list("session_id", flat=True):
            services.session_mark_read(session_id=session_id, reader_id=reader_id, scope=Scope.unrestricted())
        self.message_user(
            request, f"Marked {queryset.count()} session(s) read for reader {reader_id}.", messages.SUCCESS
        )

    @admin.action(description="Evict storage now (delete the PVC)")
    def evict_storage(self, request, queryset):
        collectable = [s for s in queryset if s.storage_kind == StorageKind.PVC and s.storage_pvc_name]
        if request.POST.get("confirmed") != "yes":
            return TemplateResponse(
                request,
                "admin/agent_sessions/session/evict_storage.html",
                {
                    **self.admin_site.each_context(request),
                    "opts": self.model._meta,
                    "title": "Evict storage now",
                    "queryset": queryset,
                    "collectable": collectable,
                    "skipped": len(queryset) - len(collectable),
                    "default_namespace": settings.AGENTRUN_NAMESPACE,
                },
            )
        outcomes = []
        for session in collectable:
            outcome, detail = services.session_storage_collect(
                session_id=session.session_id,
                delete_pvc=kube.delete_pvc,
                default_namespace=settings.AGENTRUN_NAMESPACE,
            )
            outcomes.append(outcome)
            if outcome == StorageOutcome.FAILED:
                self.message_user(request, f"Session {session.session_id}: {detail}", messages.ERROR)
        done = sum(o in (StorageOutcome.DELETED, StorageOutcome.ABSENT) for o in outcomes)
        self.message_user(
            request,
            f"Evicted the storage of {done} session(s).",
            messages.SUCCESS if done == len(collectable) else messages.WARNING,
        )
        return None
