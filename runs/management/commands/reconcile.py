"""Compare runner jobs with Kubernetes: fail runs whose Job failed or vanished or whose pod cannot go on,
delete Jobs of ended runs."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from agentrun import kube
from agentrun.launcher.kubernetes import KubernetesLauncher
from runs import reconciling


class Command(BaseCommand):
    help = (
        "Fail claimed runs whose runner Job failed or vanished (runner-lost); fail pending and claimed runs "
        "whose runner pod cannot go on (unschedulable past the grace, an image that cannot be pulled, a "
        "container that cannot be configured: infra-failed; OOMKilled: agent-failed; evicted, disrupted or "
        "node lost: runner-lost); delete runner Jobs whose runs have ended or do not exist. Needs the "
        "kubernetes launcher's settings."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Report; change nothing.")

    def handle(self, *args, dry_run: bool, **options):
        try:
            findings = reconciling.reconcile(KubernetesLauncher(), dry_run=dry_run)
        except (kube.KubeError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        for item in findings:
            verb = {
                "fail-run": "would fail run" if dry_run else "failed run",
                "delete-job": "would delete Job" if dry_run else "deleted Job",
                "delete-policy": "would delete NetworkPolicy" if dry_run else "deleted NetworkPolicy",
            }[item.action]
            if item.action == "fail-run":
                self.stdout.write(f"{verb} {item.run_id} ({item.kind}, {item.reason}): {item.detail}")
            else:
                self.stdout.write(f"{verb} {item.job}: {item.detail}")
        self.stdout.write(f"{'dry run: ' if dry_run else ''}{len(findings)} finding(s)")
