"""The worker's wiring, at the top of the house with the URL conf: one loop that settles and
dispatches queue tasks, starts runners for pending runs, stops the runners of ended runs, reaps
lost and timed-out runs and (on Kubernetes) reconciles runner jobs; beside it, on threads of
their own, webhook delivery, retention (the event table's partitions ahead, and pruning) and
session storage collection. `manage.py worker` (agentrun/management/commands/worker.py) runs it."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.core.management import call_command
from django.db import connection

from agentrun import webhooks
from agentrun.durations import parse_duration
from agentrun.launcher import Launcher, launcher_from_settings
from agentrun.launcher.kubernetes import KubernetesLauncher
from queues import retention
from queues.dispatcher import Dispatcher, serve_loop
from runs import launching, reaping, reconciling
from runs.reaping import Reaped

logger = logging.getLogger("agentrun.worker")


@dataclass
class Pass:
    """What one pass of the loop did."""

    settled: int = 0
    dispatched: int = 0
    launched: int = 0
    stopped: int = 0
    reaped: list[Reaped] = field(default_factory=list)
    reconciled: int = 0
    webhooks: int = 0

    def __str__(self) -> str:
        return (
            f"settled {self.settled} attempt(s), dispatched {self.dispatched} task(s), "
            f"launched {self.launched} runner(s), stopped {self.stopped} runner(s), "
            f"reaped {len(self.reaped)} run(s), reconciled {self.reconciled} job(s), "
            f"sent {self.webhooks} webhook(s)"
        )


class Worker:
    """The loop's state: its launcher, its dispatcher and when the reaper and the reconciler run next."""

    def __init__(self, launcher: Launcher | None = None) -> None:
        self.launcher = launcher or launcher_from_settings()
        self.dispatcher = Dispatcher()
        self.next_reap = self.next_reconcile = 0.0

    def run_pass(self, *, force: bool = False) -> Pass:
        """Settle and dispatch, launch, stop; reap and reconcile when their intervals are up (or `force`)."""
        done = Pass()
        done.settled, done.dispatched = self.dispatcher.run_once()
        done.launched = launching.launch_pending(self.launcher)
        done.stopped = launching.stop_finished(self.launcher)
        now = time.monotonic()
        if force or now >= self.next_reap:
            done.reaped = reaping.reap()
            self.next_reap = now + settings.AGENTRUN_REAP_INTERVAL_SECONDS
        if isinstance(self.launcher, KubernetesLauncher) and (force or now >= self.next_reconcile):
            findings = reconciling.reconcile(self.launcher)
            for item in findings:
                logger.warning("reconciled: %s %s %s (%s)", item.action, item.run_id, item.job, item.detail)
            done.reconciled = len(findings)
            self.next_reconcile = now + settings.AGENTRUN_RECONCILE_INTERVAL_SECONDS
        if force:  # serving, webhooks have their own thread (a slow receiver holds up nothing else)
            done.webhooks = len(webhooks.deliver_due())
        return done

    def step(self) -> float:
        """One pass of the loop; returns how long to wait for the next one."""
        done = self.run_pass()
        if done.settled or done.dispatched or done.launched or done.stopped or done.reaped:
            logger.info("worker: %s", done)
        for item in done.reaped:
            logger.warning("reaped run %s: %s (%s)", item.run_id, item.reason, item.detail)
        return min(self.dispatcher.sleep_seconds(), max(0.1, self.next_reap - time.monotonic()))

    def serve(self, stop: threading.Event, *, gc_interval: float, out, err) -> list[threading.Thread]:
        """Start the loop (and the collector, unless `gc_interval` is 0) until `stop` is set."""
        threads = [
            threading.Thread(target=serve_loop, args=(stop, self.step), name="worker", daemon=True),
            threading.Thread(target=deliver_loop, args=(stop,), name="webhooks", daemon=True),
            threading.Thread(
                target=maintain_loop,
                args=(stop, settings.AGENTRUN_PRUNE_INTERVAL_SECONDS),
                name="retention",
                daemon=True,
            ),
        ]
        if gc_interval > 0:
            threads.append(
                threading.Thread(target=collect_loop, args=(stop, gc_interval, out, err), name="gc", daemon=True)
            )
        for thread in threads:
            thread.start()
        return threads


def collect(out, err) -> None:
    """One gc_sessions pass."""
    call_command("gc_sessions", stdout=out, stderr=err)


def collect_loop(stop: threading.Event, interval: float, out, err) -> None:
    """gc_sessions every `interval` seconds on its own thread (and connection); a failed pass is
    logged, never fatal to the worker."""
    while not stop.wait(interval):
        try:
            collect(out, err)
        except Exception:
            logger.exception("gc_sessions pass failed")
        finally:
            connection.close()


def maintain_loop(stop: threading.Event, interval: float) -> None:
    """The event table's partitions ahead, and pruning by retention (AGENTRUN_RETENTION), at
    start and every `interval` seconds on its own thread; a failed pass is logged, never fatal."""
    while not stop.is_set():
        try:
            older_than = parse_duration(settings.AGENTRUN_RETENTION) if settings.AGENTRUN_RETENTION else None
            made, pruned = retention.maintain(older_than=older_than)
            if made:
                logger.info("made event partitions %s", ", ".join(made))
            if pruned:
                logger.info("pruned: %s", pruned)
        except Exception:
            logger.exception("a retention pass failed")
        finally:
            connection.close()
        stop.wait(interval)


def deliver_loop(stop: threading.Event, *, idle: float = 1.0) -> None:
    """Webhooks on their own thread (and connection): what is due, then a wait until the next
    is due (at most `idle`); a failed pass is logged, never fatal to the worker."""
    while not stop.is_set():
        wait = idle
        try:
            sent = webhooks.deliver_due()
            wait = 0.0 if len(sent) >= 50 else webhooks.next_due_in(idle)
        except Exception:
            logger.exception("a webhook pass failed")
            connection.close()
        stop.wait(max(wait, 0.05))
    connection.close()
