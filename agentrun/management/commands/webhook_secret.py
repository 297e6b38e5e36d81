"""`manage.py webhook_secret --tenant T [--rotate]`: print a tenant's webhook signing secret."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agentrun import webhooks


class Command(BaseCommand):
    help = (
        "Print the tenant's webhook signing secret, alone, on stdout (made if it has none); --rotate "
        "replaces it, and every delivery from then on is signed with the new one."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--tenant", required=True)
        parser.add_argument("--rotate", action="store_true", help="Replace the secret with a new one.")

    def handle(self, *args: Any, tenant: str, rotate: bool, **options: Any) -> None:
        tenant = tenant.strip()
        if not tenant or len(tenant) > 200:
            raise CommandError("--tenant must be 1 to 200 characters")
        self.stdout.write(webhooks.tenant_secret(tenant, rotate=rotate))
