"""Django admin for API keys: create one (shown once), revoke with an action."""

from django.contrib import admin, messages
from django.utils import timezone

from agentrun.auth import api_key_create, api_key_revoke
from agentrun.errors import AgentRunError
from agentrun.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "prefix",
        "name",
        "tenant_id",
        "project_id",
        "role",
        "run_id",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("role", "tenant_id")
    search_fields = ("prefix", "name", "tenant_id", "project_id", "run_id")
    fields = (
        "name",
        "tenant_id",
        "project_id",
        "role",
        "run_id",
        "expires_at",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke",)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None:
            return self.fields
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return
        expires_in = obj.expires_at - timezone.now() if obj.expires_at is not None else None
        try:
            key, raw = api_key_create(
                tenant_id=obj.tenant_id,
                project_id=obj.project_id,
                role=obj.role,
                run_id=obj.run_id,
                name=obj.name,
                expires_in=expires_in,
            )
        except AgentRunError as exc:
            self.message_user(request, f"No key was created: {exc.message}", messages.ERROR)
            return
        obj.pk, obj.expires_at = key.pk, key.expires_at
        obj.prefix, obj.key_hash, obj.created_at = key.prefix, key.key_hash, key.created_at
        self.message_user(request, f"New API key (shown once, copy it now): {raw}", messages.WARNING)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = api_key_revoke(key_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Revoked {count} keys.")
