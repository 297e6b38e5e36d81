"""`manage.py prune --older-than 30d [--dry-run]`: delete what ended before its retention."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agentrun.clock import db_now
from agentrun.durations import duration_argument, parse_duration
from queues import retention
from runs.retention import ensure_partitions


class Command(BaseCommand):
    help = (
        "Delete ended runs (their events, commands, runner jobs), finished queue tasks and sent webhooks "
        "older than --older-than (a tenant's own retention, in admin, overrides it). Whole weeks of events "
        "go at once (their partition is dropped), the rest in small batches. Sessions keep their summary."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--older-than",
            type=duration_argument,
            default=None,
            help="Keep this long: 30d, 12h, 2w (default: AGENTRUN_RETENTION).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Count what would go; change nothing.")
        parser.add_argument("--batch", type=int, default=500, help="Ended runs a batch (default 500).")
        parser.add_argument(
            "--pause",
            type=float,
            default=0.05,
            help="Seconds between transactions, for the writers (default 0.05).",
        )

    def handle(self, *args: Any, older_than: Any, dry_run: bool, batch: int, pause: float, **options: Any) -> None:
        if older_than is None:
            if not settings.AGENTRUN_RETENTION:
                raise CommandError("give --older-than (AGENTRUN_RETENTION is off)")
            older_than = parse_duration(settings.AGENTRUN_RETENTION)
        if not 1 <= batch <= 10_000:
            raise CommandError("--batch must be from 1 to 10000")
        if not 0 <= pause <= 60:
            raise CommandError("--pause must be from 0 to 60 seconds")
        if not dry_run:
            ensure_partitions(now=db_now())
        done = retention.prune(older_than=older_than, dry_run=dry_run, batch=batch, pause=pause)
        if dry_run:
            self.stdout.write(
                f"dry run: would drop {len(done.partitions)} event partition(s) ({', '.join(done.partitions) or '-'}) "
                f"and delete {done.deleted.runs} run(s) and {done.tasks} queue task(s); nothing changed"
            )
            return
        self.stdout.write(str(done))
