"""Collect expired session storage: delete each expired session's PVC and mark it evicted."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agentrun import kube, tallies
from agentrun.clock import db_now
from agentrun.wire import iso
from sessions import selectors, services
from sessions.services import StorageOutcome


def _limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise CommandError("--limit must be an integer") from None
    if limit < 1:
        raise CommandError("--limit must be at least 1")
    return min(limit, settings.AGENTRUN_GC_MAX_LIMIT)


class Command(BaseCommand):
    help = (
        "Delete the PVCs of sessions whose storage has expired (oldest first) and mark them evicted. "
        "A PVC already gone counts as deleted; a Kubernetes error leaves the session as it was and "
        "makes the command exit 1. Safe to run from several places at once."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="List what would be collected; change nothing.")
        parser.add_argument(
            "--limit",
            type=_limit,
            default=settings.AGENTRUN_GC_DEFAULT_LIMIT,
            help=f"At most this many sessions (default {settings.AGENTRUN_GC_DEFAULT_LIMIT}, "
            f"at most {settings.AGENTRUN_GC_MAX_LIMIT}).",
        )

    def handle(self, *args, dry_run: bool, limit: int, **options):
        now = db_now()
        candidates = selectors.gc_candidates(now=now, limit=limit)
        namespace = settings.AGENTRUN_NAMESPACE
        if dry_run:
            for session in candidates:
                self.stdout.write(
                    f"would delete {session.storage_namespace or namespace}/{session.storage_pvc_name} "
                    f"session={session.session_id} expiresAt={iso(session.expires_at)}"
                )
            self.stdout.write(f"dry run: {len(candidates)} expired session(s), nothing changed")
            return
        if candidates:
            try:
                kube.api_client()
            except kube.KubeError as exc:
                raise CommandError(str(exc)) from None
        counts = dict.fromkeys(
            (StorageOutcome.DELETED, StorageOutcome.ABSENT, StorageOutcome.FAILED, StorageOutcome.SKIPPED), 0
        )
        for session in candidates:
            outcome, detail = services.session_storage_collect(
                session_id=session.session_id, delete_pvc=kube.delete_pvc, default_namespace=namespace, expired_at=now
            )
            counts[outcome] += 1
            line = f"{outcome} {detail} session={session.session_id}"
            (self.stderr if outcome == StorageOutcome.FAILED else self.stdout).write(line)
        tallies.add(tallies.GC_RESULTS, {str(outcome): n for outcome, n in counts.items()})
        self.stdout.write(
            f"deleted {counts[StorageOutcome.DELETED]}, already gone {counts[StorageOutcome.ABSENT]}, "
            f"failed {counts[StorageOutcome.FAILED]}, skipped {counts[StorageOutcome.SKIPPED]}"
        )
        if counts[StorageOutcome.FAILED]:
            raise CommandError(f"{counts[StorageOutcome.FAILED]} session(s) could not be collected")
