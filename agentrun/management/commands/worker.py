"""`manage.py worker`: the long-running worker. Its wiring (which loops, over which apps) is
`settings.AGENTRUN_WORKER` (settings/worker.py), at the top of the house; this is only its CLI."""

from __future__ import annotations

import importlib
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Run the worker: queue dispatcher, runner launcher (AGENTRUN_LAUNCHER), lease reaper, runner job "
        "reconciler (on Kubernetes), webhook delivery, retention (event partitions ahead, pruning) and "
        "session storage GC."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--once",
            action="store_true",
            help=(
                "One pass (reaper, reconciler, webhooks and, unless --gc-interval is 0, GC included; "
                "pruning is prune's), then exit."
            ),
        )
        parser.add_argument(
            "--gc-interval",
            type=float,
            default=settings.AGENTRUN_GC_INTERVAL_SECONDS,
            help="Seconds between gc_sessions passes (0: never).",
        )

    def handle(self, *args: object, once: bool, gc_interval: float, **options: object) -> None:
        wiring = importlib.import_module(settings.AGENTRUN_WORKER)
        worker = wiring.Worker()
        try:
            if once:
                self.stdout.write(str(worker.run_pass(force=True)))
                if gc_interval > 0:
                    wiring.collect(self.stdout, self.stderr)
                return
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            threads = worker.serve(stop, gc_interval=gc_interval, out=self.stdout, err=self.stderr)
            self.stdout.write(f"worker: launcher {worker.launcher.name}; {', '.join(t.name for t in threads)} running")
            self.stdout.flush()
            stop.wait()
            for thread in threads:
                thread.join(timeout=35)
        finally:
            worker.launcher.close()
