from django.core.management.base import BaseCommand, CommandError

from agentrun.auth import Role, api_key_create
from agentrun.durations import duration_argument
from agentrun.errors import AgentRunError


class Command(BaseCommand):
    help = "Create an API key and print it, alone, on stdout. Only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", required=True)
        parser.add_argument("--project", default=None)
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument("--run", default=None, help="Scope a runner key to one run.")
        parser.add_argument("--name", default="", help="A label shown in admin.")
        parser.add_argument(
            "--expires-in",
            type=duration_argument,
            default=None,
            help="The key stops working after this long: 30d, 12h, 90m, or seconds (default: never).",
        )

    def handle(self, *args, tenant, project, role, run, name, expires_in, **options):
        try:
            _key, raw = api_key_create(
                tenant_id=tenant, project_id=project, role=role, run_id=run, name=name, expires_in=expires_in
            )
        except AgentRunError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(raw)
