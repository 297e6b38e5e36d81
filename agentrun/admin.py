"""Django admin for API keys: create one (shown once), revoke with an action."""

from django.contrib import admin, messages

from agentrun.auth import api_key_create, api_key_revoke
from agentrun.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "tenant_id", "project_id", "role", "run_id", "created_at", "revoked_at")
    list_filter = ("role", "tenant_id")
    search_fields = ("prefix", "name", "tenant_id", "project_id", "run_id")
    fields = ("name", "tenant_id", "project_id", "role", "run_id", "prefix", "created_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "revoked_at")
    actions = ("revoke",)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None:
            return ("name", "tenant_id", "project_id", "role", "run_id", "prefix", "created_at", "revoked_at")
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return
        key, raw = api_key_create(
            tenant_id=obj.tenant_id, project_id=obj.project_id, role=obj.role, run_id=obj.run_id, name=obj.name
        )
        obj.pk = key.pk
        obj.prefix, obj.key_hash, obj.created_at = key.prefix, key.key_hash, key.created_at
        self.message_user(request, f"New API key (shown once, copy it now): {raw}", messages.WARNING)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = api_key_revoke(key_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Revoked {count} keys.")
