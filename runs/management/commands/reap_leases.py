"""Finish runs whose runner is gone (lease lapsed past the grace period) or whose time is up."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from runs import reaping


class Command(BaseCommand):
    help = (
        f"Fail runs whose lease lapsed more than AGENTRUN_REAP_GRACE_SECONDS "
        f"({settings.AGENTRUN_REAP_GRACE_SECONDS:g} s) ago with runner-lost, and runs claimed longer than "
        "their executionPolicy.timeoutSeconds with timeout."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Say which runs are due; change nothing.")

    def handle(self, *args, dry_run: bool, **options):
        reaped = reaping.reap(dry_run=dry_run)
        verb = "would fail" if dry_run else "failed"
        for item in reaped:
            self.stdout.write(f"{verb} {item.run_id}: {item.reason} ({item.detail})")
        self.stdout.write(f"{'dry run: ' if dry_run else ''}{len(reaped)} run(s) {'due' if dry_run else 'reaped'}")
