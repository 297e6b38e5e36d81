"""The long-running worker: the queue dispatcher, the launcher (a runner for every pending run),
the reaper, and session storage collection on a timer."""

from __future__ import annotations

import logging
import signal
import threading
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

from agentrun.launcher import launcher_from_settings
from queues.dispatcher import Dispatcher, serve_loop
from runs import launching, reaping, reconciling

logger = logging.getLogger("agentrun.worker")


class Worker:
    """One pass: settle and dispatch queue tasks, start runners for pending runs, stop runners of
    ended runs, and (every AGENTRUN_REAP_INTERVAL_SECONDS) reap lost and timed-out runs."""

    def __init__(self, launcher=None):
        self.launcher = launcher or launcher_from_settings()
        self.dispatcher = Dispatcher()
        self.next_reap = self.next_reconcile = 0.0

    def step(self) -> float:
        settled, dispatched = self.dispatcher.run_once()
        launched = launching.launch_pending(self.launcher)
        stopped = launching.stop_finished(self.launcher)
        reaped = []
        if time.monotonic() >= self.next_reap:
            reaped = reaping.reap()
            self.next_reap = time.monotonic() + settings.AGENTRUN_REAP_INTERVAL_SECONDS
        if self.launcher.name == "kubernetes" and time.monotonic() >= self.next_reconcile:
            for item in reconciling.reconcile(self.launcher):
                logger.warning("reconciled: %s %s %s (%s)", item.action, item.run_id, item.job, item.detail)
            self.next_reconcile = time.monotonic() + settings.AGENTRUN_RECONCILE_INTERVAL_SECONDS
        if settled or dispatched or launched or stopped or reaped:
            logger.info(
                "worker: settled %d, dispatched %d, launched %d, stopped %d, reaped %d",
                settled,
                dispatched,
                launched,
                stopped,
                len(reaped),
            )
        for item in reaped:
            logger.warning("reaped run %s: %s (%s)", item.run_id, item.reason, item.detail)
        return min(self.dispatcher.sleep_seconds(), max(0.1, self.next_reap - time.monotonic()))


class Command(BaseCommand):
    help = (
        "Run the worker: queue dispatcher, runner launcher (AGENTRUN_LAUNCHER), lease reaper, and session storage GC."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="One pass, then exit.")
        parser.add_argument(
            "--gc-interval",
            type=float,
            default=settings.AGENTRUN_GC_INTERVAL_SECONDS,
            help="Seconds between gc_sessions passes (0: never).",
        )

    def handle(self, *args, once: bool, gc_interval: float, **options):
        worker = Worker()
        if once:
            settled, dispatched = worker.dispatcher.run_once()
            launched = launching.launch_pending(worker.launcher)
            reaped = reaping.reap()
            self.stdout.write(
                f"settled {settled} attempt(s), dispatched {dispatched} task(s), "
                f"launched {launched} runner(s), reaped {len(reaped)} run(s)"
            )
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        threads = [threading.Thread(target=serve_loop, args=(stop, worker.step), name="worker", daemon=True)]
        if gc_interval > 0:
            threads.append(threading.Thread(target=self._gc_loop, args=(stop, gc_interval), name="gc", daemon=True))
        for thread in threads:
            thread.start()
        self.stdout.write(f"worker: launcher {worker.launcher.name}; {', '.join(t.name for t in threads)} running")
        self.stdout.flush()
        stop.wait()
        for thread in threads:
            thread.join(timeout=35)
        worker.launcher.close()

    def _gc_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                call_command("gc_sessions", stdout=self.stdout, stderr=self.stderr)
            except Exception:
                logger.exception("gc_sessions pass failed")
            finally:
                connection.close()
