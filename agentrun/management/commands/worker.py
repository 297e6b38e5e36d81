"""The long-running worker: the queue dispatcher, and session storage collection on a timer."""

from __future__ import annotations

import logging
import signal
import threading

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

from queues.dispatcher import Dispatcher

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run the dispatcher (queue tasks into runs, runs' ends into task states) and session storage GC."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="One dispatcher pass, then exit.")
        parser.add_argument("--gc-interval", type=float, default=settings.AGENTRUN_GC_INTERVAL_SECONDS,
                            help="Seconds between gc_sessions passes (0: never).")

    def handle(self, *args, once: bool, gc_interval: float, **options):
        dispatcher = Dispatcher()
        if once:
            settled, dispatched = dispatcher.run_once()
            self.stdout.write(f"settled {settled} attempt(s), dispatched {dispatched} task(s)")
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        threads = [threading.Thread(target=dispatcher.serve, args=(stop,), name="dispatcher", daemon=True)]
        if gc_interval > 0:
            threads.append(threading.Thread(target=self._gc_loop, args=(stop, gc_interval), name="gc", daemon=True))
        for thread in threads:
            thread.start()
        self.stdout.write(f"worker: {', '.join(t.name for t in threads)} running; Ctrl-C stops")
        stop.wait()
        for thread in threads:
            thread.join(timeout=35)

    def _gc_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                call_command("gc_sessions", stdout=self.stdout, stderr=self.stderr)
            except Exception:  # noqa: BLE001 - reported; the next pass tries again
                logger.exception("gc_sessions pass failed")
            finally:
                connection.close()
