"""Compare runner jobs with Kubernetes: fail runs whose Job failed or vanished, delete Jobs of ended runs."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from agentrun import kube
from agentrun.launcher.kubernetes import KubernetesLauncher
from runs import reconciling


class Command(BaseCommand):
    help = (
        "Fail claimed runs whose runner Job failed or vanished (runner-lost), and delete runner Jobs whose "
        "runs have ended or do not exist. Needs the kubernetes launcher's settings."
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
            }[item.action]
            target = item.run_id if item.action == "fail-run" else item.job
            self.stdout.write(f"{verb} {target}: {item.detail}")
        self.stdout.write(f"{'dry run: ' if dry_run else ''}{len(findings)} finding(s)")
