"""Push, not poll: one LISTEN connection per server process wakes the requests that wait.

Writers call `notify(topic)` inside their transaction; PostgreSQL delivers NOTIFY at commit,
so a waiter never wakes before the rows it waits for are visible. Readers subscribe to a topic
*before* they look at the rows, then sleep on an Event until a notification or their deadline.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.db import connection, connections
from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

Fetch = Callable[[], Any]
Render = Callable[[Any], bytes]

logger = logging.getLogger(__name__)

CHANNEL = "agentrun"
# The background worker's channel: few notifications, none of the per-run event traffic.
WORK_CHANNEL = "agentrun_work"
# If the listener cannot connect, waiters re-check this often instead of hanging until the deadline.
DEGRADED_POLL_SECONDS = 0.5


RUNS_CREATED = "runs:created"  # a run was created (it needs a runner)
RUNS_ENDED = "runs:ended"  # some run finished or was cancelled
QUEUE_CHANGED = "queue:changed"  # a queue task was created, or may be dispatched again
WORK_TOPICS = frozenset({RUNS_CREATED, RUNS_ENDED, QUEUE_CHANGED})


def notify(topic: str) -> None:
    """Queue a notification for `topic`; it is delivered when the current transaction commits."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [WORK_CHANNEL if topic in WORK_TOPICS else CHANNEL, topic])


def run_topic(run_id: str) -> str:
    return f"run:{run_id}"


def session_topic(session_id: str) -> str:
    """Notified when a run of the session is created (a session's stream moves on to it)."""
    return f"session:{session_id}"


def conninfo(alias: str = "default") -> dict:
    settings_dict = connections[alias].settings_dict
    params = {
        "dbname": settings_dict["NAME"],
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": settings_dict.get("PORT") or None,
    }
    for key, value in (settings_dict.get("OPTIONS") or {}).items():
        if key not in {"pool", "isolation_level", "server_side_binding", "assume_role"}:
            params[key] = value
    return {key: value for key, value in params.items() if value is not None}


class _SharedFetch:
    """One fetch done for every waiter that woke for the same topic and the same question."""

    __slots__ = ("done", "failed", "generation", "result")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.done = threading.Event()
        self.result: Any = None
        self.failed = False


class _Waiter:
    __slots__ = ("event", "question", "topic")

    def __init__(self, topic: str, question: tuple[object, Fetch] | None = None) -> None:
        self.topic = topic
        self.question = question  # (share_key, fetch): what this waiter will ask once woken
        self.event = threading.Event()


class NotificationHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[_Waiter]] = {}
        # Per topic: how many notifications arrived, and the fetches shared among its waiters.
        self._generations: dict[str, int] = {}
        self._shared: dict[str, dict[object, _SharedFetch]] = {}
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._conninfo: dict | None = None
        self._stopping = False

    def add_waiter(self, topic: str, question: tuple[object, Fetch] | None = None) -> _Waiter:
        waiter = _Waiter(topic, question)
        self._ensure_started()
        with self._lock:
            self._waiters.setdefault(topic, set()).add(waiter)
        return waiter

    def remove_waiter(self, waiter: _Waiter) -> None:
        with self._lock:
            peers = self._waiters.get(waiter.topic)
            if peers is not None:
                peers.discard(waiter)
                if not peers:
                    del self._waiters[waiter.topic]
                    self._shared.pop(waiter.topic, None)
                    self._generations.pop(waiter.topic, None)

    @contextmanager
    def subscribe(self, topic: str) -> Iterator[_Waiter]:
        waiter = self.add_waiter(topic)
        try:
            yield waiter
        finally:
            self.remove_waiter(waiter)

    def wait(self, waiter: _Waiter, timeout: float) -> bool:
        """Sleep until the topic is notified or `timeout` passes; True when notified."""
        if not self._listening.is_set():
            timeout = min(timeout, DEGRADED_POLL_SECONDS)
        woke = waiter.event.wait(timeout)
        waiter.event.clear()
        return woke

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening (tests, before their database is dropped; and at exit)."""
        self._stopping = True
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None
        self._conninfo = None
        self._listening.clear()
        self._stopping = False

    def _ensure_started(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._conninfo == conninfo():
            return
        with self._lock:
            info = conninfo()
            if self._thread is not None and self._thread.is_alive() and self._conninfo == info:
                return
            # The database changed (a test database was set up): listen there instead.
            self._conninfo = info
            self._listening.clear()
            self._thread = threading.Thread(target=self._run, args=(info,), name="agentrun-listen", daemon=True)
            self._thread.start()
        # Wait briefly for LISTEN, so a notification committed right after subscribing is not lost.
        self._listening.wait(2.0)

    def _run(self, info: dict) -> None:
        backoff = 0.2
        while not self._stopping and self._conninfo == info:
            try:
                with psycopg.connect(**info, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 0.2
                    # Anything committed while we were not listening is unseen: wake everyone to re-check.
                    self._wake_all()
                    while not self._stopping and self._conninfo == info:
                        for note in conn.notifies(timeout=0.25):
                            self._answer(note.payload)
            except Exception:
                self._listening.clear()
                if self._stopping:
                    break
                self._wake_all()
                logger.warning("notification listener lost its connection; retrying", exc_info=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._listening.clear()

    def shared_fetch(self, topic: str, key: object, fetch: Fetch) -> Any:
        """`fetch()` for a waiter that just woke on `topic`, done once for all the waiters asking
        the same `key`: a hundred clients following one run cost one query, not a hundred.

        Safe because a result is reused only by waiters whose notifications had all arrived
        before that fetch began, and a notification arrives only after its commit.
        """
        with self._lock:
            generation = self._generations.get(topic, 0)
            fetches = self._shared.setdefault(topic, {})
            shared = fetches.get(key)
            leader = shared is None or shared.generation < generation or shared.failed
            if shared is None or leader:
                shared = fetches[key] = _SharedFetch(generation)
        if leader:
            try:
                shared.result = fetch()
            except BaseException:
                shared.failed = True
                raise
            finally:
                shared.done.set()
            return shared.result
        if not shared.done.wait(30) or shared.failed:
            return fetch()
        return shared.result

    def _answer(self, topic: str) -> None:
        """A notification: fetch the answer to each distinct question its waiters will ask, here
        and once, then wake them. Fetching before a crowd of threads wakes (and queues for the
        GIL) is what keeps a wide fan-out fast; a waiter whose question failed asks itself."""
        with self._lock:
            if topic not in self._waiters:
                return
            generation = self._generations.get(topic, 0) + 1
            self._generations[topic] = generation
            questions = {w.question[0]: w.question[1] for w in self._waiters[topic] if w.question is not None}
            fetches = self._shared.setdefault(topic, {})
            prepared = {key: fetches.setdefault(key, _SharedFetch(generation)) for key in questions}
            for key, shared in list(prepared.items()):
                if shared.generation != generation:
                    prepared[key] = fetches[key] = _SharedFetch(generation)
        try:
            for key, fetch in questions.items():
                shared = prepared[key]
                try:
                    shared.result = fetch()
                except Exception:  # noqa: BLE001 - the waiters will fetch for themselves
                    shared.failed = True
                finally:
                    shared.done.set()
        finally:
            connection.close()
            self._wake(topic, counted=True)

    def _wake(self, topic: str, counted: bool = False) -> None:
        with self._lock:
            if topic in self._waiters and not counted:
                self._generations[topic] = self._generations.get(topic, 0) + 1
            waiters = list(self._waiters.get(topic, ()))
        for waiter in waiters:
            waiter.event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for topic in self._waiters:
                self._generations[topic] = self._generations.get(topic, 0) + 1
            waiters = [w for peers in self._waiters.values() for w in peers]
        for waiter in waiters:
            waiter.event.set()


hub = NotificationHub()
atexit.register(hub.stop)


def release_connection() -> None:
    """Give the request's database connection back while it sleeps, so waiting requests hold
    no connection (with a pool it returns to the pool; without one the next query reconnects)."""
    if not connection.in_atomic_block:
        connection.close()


class _LongPoll:
    """The body of a long-poll response: it sleeps until the topic is notified or the deadline,
    then yields the rendered answer.

    The wait happens while the WSGI server iterates the body, after Django and DRF have done
    their part (auth, validation, the first look, middleware). A woken waiter then costs only
    a shared fetch and a write, so one append can wake a hundred followers at once.
    """

    def __init__(self, waiter: _Waiter, *, deadline: float, fetch: Fetch, share_key: object, render: Render) -> None:
        self.waiter, self.deadline, self.fetch, self.share_key, self.render = waiter, deadline, fetch, share_key, render
        self.finished = False

    def __iter__(self) -> _LongPoll:
        return self

    def __next__(self) -> bytes:
        if self.finished:
            raise StopIteration
        self.finished = True
        result = None
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                woke = remaining > 0 and hub.wait(self.waiter, remaining)
                result = hub.shared_fetch(self.waiter.topic, self.share_key, self.fetch) if woke else self.fetch()
                release_connection()
                if result or self.deadline <= time.monotonic():
                    break
        except Exception:
            logger.warning(
                "long-poll on %s failed while waiting; answering with no items", self.waiter.topic, exc_info=True
            )
            result = None
        finally:
            self.close()
            release_connection()
        return self.render(result)

    def close(self) -> None:
        hub.remove_waiter(self.waiter)


def long_poll(topic: str, *, timeout: float, fetch: Fetch, share_key: object, render: Render) -> HttpResponseBase:
    """Answer with `render(fetch())` as soon as `fetch()` is non-empty, or after `timeout`
    with its last (empty) value; `render(None)` must answer "nothing yet". Waiters with the
    same `share_key` (the same question about the same topic) share each wake-up's fetch."""
    if timeout <= 0:
        return HttpResponse(render(fetch()), content_type="application/json")
    deadline = time.monotonic() + timeout
    # Subscribe before the first look, so a commit right after it still wakes us.
    waiter = hub.add_waiter(topic, (share_key, fetch))
    try:
        result = fetch()
    except BaseException:
        hub.remove_waiter(waiter)
        raise
    if result:
        hub.remove_waiter(waiter)
        return HttpResponse(render(result), content_type="application/json")
    release_connection()
    return StreamingHttpResponse(
        _LongPoll(waiter, deadline=deadline, fetch=fetch, share_key=share_key, render=render),
        content_type="application/json",
    )
