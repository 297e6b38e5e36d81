"""The dispatcher: moves queue tasks. It settles the attempts whose run ended, then starts every
task that may start, then sleeps until a task is created, a run ends, or a backoff expires
(LISTEN on the worker channel: it never polls on a timer to find work)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
from django.db import close_old_connections, connection

from agentrun import notify
from agentrun.clock import db_now
from queues import services

logger = logging.getLogger(__name__)
# However quiet, look again this often (a notification lost with a dropped connection).
IDLE_SECONDS = 30.0
BATCH = 50


def listen_for_work() -> psycopg.Connection:
    """A connection of its own that LISTENs on the worker channel."""
    listener = psycopg.connect(**notify.conninfo(), autocommit=True)
    listener.execute(f"LISTEN {notify.WORK_CHANNEL}")
    return listener


def wait_for_work(listener: psycopg.Connection, stop: threading.Event, timeout: float) -> None:
    """Until a notification, `timeout` or `stop` (checked every second). Notifications that came
    with the first are drained, so one pass serves them all."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
        if any(True for _ in listener.notifies(timeout=min(remaining, 1.0), stop_after=1)):
            for _ in listener.notifies(timeout=0.01):
                pass
            return


class Dispatcher:
    """The queue's moves. Runners for the runs it creates are started by the worker's launch
    pass, like any pending run's."""

    def run_once(self) -> tuple[int, int]:
        """Settle and dispatch, a batch of each in turn, until neither has anything left:
        (attempts settled, tasks dispatched). Taking turns keeps finished tasks from waiting
        behind a long stream of new ones."""
        settled = dispatched = 0
        while True:
            ended = services.attempts_to_settle(limit=BATCH)
            settled_now = sum(services.settle_attempt(ended=attempt) is not None for attempt in ended)
            started_now = 0
            while started_now < BATCH and services.dispatch_one() is not None:
                started_now += 1
            settled, dispatched = settled + settled_now, dispatched + started_now
            # Done when both ran dry, or when nothing moved (another worker holds what is left).
            if (len(ended) < BATCH and started_now < BATCH) or not (settled_now or started_now):
                return settled, dispatched

    def sleep_seconds(self) -> float:
        """How long the dispatcher may sleep if nothing wakes it: until the earliest backoff."""
        retry_at = services.next_retry_at()
        if retry_at is None:
            return IDLE_SECONDS
        return max(0.0, min(IDLE_SECONDS, (retry_at - db_now()).total_seconds()))

    def step(self) -> float:
        """One pass; how long to sleep if nothing wakes us."""
        settled, dispatched = self.run_once()
        if settled or dispatched:
            logger.info("dispatcher: settled %d attempt(s), started %d task(s)", settled, dispatched)
        return self.sleep_seconds()

    def serve(self, stop: threading.Event) -> None:
        serve_loop(stop, self.step)


def serve_loop(stop: threading.Event, step: Callable[[], float]) -> None:
    """Call `step` until `stop` is set; after each, sleep until work is notified or the time
    `step` returned has passed. A failing step (a lost database) is retried after a second."""
    listener = None
    try:
        while not stop.is_set():
            try:
                if listener is None:
                    listener = listen_for_work()
                timeout = step()
            except Exception:
                logger.exception("worker pass failed; retrying")
                timeout = 1.0
                if listener is not None and listener.closed:
                    listener = None
            finally:
                close_old_connections()
                connection.close()
            if listener is None:
                stop.wait(timeout)
            else:
                try:
                    wait_for_work(listener, stop, timeout)
                except psycopg.Error:
                    listener.close()
                    listener = None
    finally:
        if listener is not None:
            listener.close()
