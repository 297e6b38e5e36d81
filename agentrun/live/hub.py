"""The event loop's side of waiting: one LISTEN connection per process (`LiveHub`), topics with
generations, waiters' futures, and looks shared among waiters (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection

from agentrun import notify

logger = logging.getLogger(__name__)

# ASGI's callables.
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
Fetch = Callable[[], Any]
Render = Callable[[Any], bytes]
# A waiter's next look: its share key and the read to run.
Question = tuple[Hashable, Callable[[], Any]]

# The environ key under which the server hands views its hub (absent under plain WSGI).
ENVIRON_KEY = "agentrun.live"
DEGRADED_POLL_SECONDS = notify.DEGRADED_POLL_SECONDS
# The listener's application_name, as pg_stat_activity shows it.
LISTENER_NAME = "agentrun-listener"
# Set when a stream closes on purpose before its response is complete (a client that stopped
# reading): the server's "returned without completing response" is then expected, not a bug.
closed_on_purpose: contextvars.ContextVar[bool] = contextvars.ContextVar("agentrun_closed_on_purpose", default=False)


class _Topic:
    __slots__ = ("futures", "generation", "name", "refs", "shared")

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0
        self.refs = 0
        # The waiters' futures, each with the question it will ask when woken (or None).
        self.futures: dict[asyncio.Future, Question | None] = {}
        # (share key, the waiters' topics) -> (their generations when the look began, its future)
        self.shared: dict[Hashable, tuple[tuple[int, ...], asyncio.Future]] = {}


class Subscription:
    """A waiter's topics, and the generation of each it saw before its last look."""

    __slots__ = ("hub", "names", "seen", "topics")

    def __init__(self, hub: LiveHub, topics: list[_Topic]) -> None:
        self.hub, self.topics = hub, topics
        self.names = tuple(topic.name for topic in topics)
        self.seen = [topic.generation for topic in topics]

    def changed(self) -> bool:
        if len(self.topics) == 1:
            return self.topics[0].generation != self.seen[0]
        return any(topic.generation != seen for topic, seen in zip(self.topics, self.seen, strict=True))

    def mark(self) -> None:
        """Call before a look: notifications from now on call for another."""
        self.seen = [topic.generation for topic in self.topics]

    def follow(self, names: tuple[str, ...]) -> bool:
        """Subscribe to `names` instead (keeping what is still named). True when a topic is new:
        nothing of it was looked at since subscribing, so the caller looks before it waits."""
        if names is self.names or names == self.names:
            return False
        keep = {topic.name: (topic, seen) for topic, seen in zip(self.topics, self.seen, strict=True)}
        topics, seen, added = [], [], False
        for name in names:
            if name in keep:
                topic, generation = keep.pop(name)
            else:
                topic = self.hub._acquire(name)
                generation, added = topic.generation, True
            topics.append(topic)
            seen.append(generation)
        for topic, _ in keep.values():
            self.hub._release(topic)
        self.topics, self.seen, self.names = topics, seen, names
        return added

    def release(self) -> None:
        for topic in self.topics:
            self.hub._release(topic)
        self.topics, self.seen, self.names = [], [], ()


class LiveHub:
    """One LISTEN connection on the server's event loop, fanned out to every waiter of the
    process. `subscribe` is safe from any thread; everything else runs on the loop."""

    def __init__(self, *, look_threads: int = 8) -> None:
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening = False
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=look_threads, thread_name_prefix="agentrun-look")
        self.listener_pid: int | None = None
        # Streams writing now (task -> when the write began), and those cancelled for taking too long.
        self.writing: dict[asyncio.Task, float] = {}
        self.stalled: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    # --- subscriptions (any thread) ---------------------------------------------------------

    def subscribe(self, names: tuple[str, ...] | list[str]) -> Subscription:
        return Subscription(self, [self._acquire(name) for name in names])

    def _acquire(self, name: str) -> _Topic:
        with self._lock:
            topic = self._topics.get(name)
            if topic is None:
                topic = self._topics[name] = _Topic(name)
            topic.refs += 1
            return topic

    def _release(self, topic: _Topic) -> None:
        with self._lock:
            topic.refs -= 1
            if topic.refs <= 0 and self._topics.get(topic.name) is topic:
                del self._topics[topic.name]

    def waiter_count(self) -> int:
        with self._lock:
            return sum(topic.refs for topic in self._topics.values())

    # --- the listener (on the loop) ---------------------------------------------------------

    async def start(self, info: dict) -> None:
        """Start listening; returns once LISTEN is in place (or after 5 s of trying)."""
        self.loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._task = self.loop.create_task(self._listen(info), name="agentrun-listen")
        self._watchdog = self.loop.create_task(self._watch_writes(), name="agentrun-stalls")
        try:
            await asyncio.wait_for(self._connected.wait(), 5.0)
        except TimeoutError:
            logger.warning("the notification listener is not connected yet; waiters poll until it is")

    async def _watch_writes(self) -> None:
        """Cancel the streams whose write has waited on their client for AGENTRUN_STREAM_STALL_SECONDS
        (one scan a second, not a timer per write: most writes finish at once)."""
        while True:
            stall = float(settings.AGENTRUN_STREAM_STALL_SECONDS)
            await asyncio.sleep(min(1.0, stall / 4))
            too_old = asyncio.get_running_loop().time() - stall
            for task, began in list(self.writing.items()):
                if began <= too_old and task not in self.stalled:
                    self.stalled.add(task)
                    task.cancel()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._task is not None:
            self._task.cancel()
            # Stopping: whatever the listener ends with, nothing is left to tell.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _listen(self, info: dict) -> None:
        backoff = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **{"application_name": LISTENER_NAME, "connect_timeout": 10, **info}, autocommit=True
                )
                async with conn:
                    await conn.execute(f"LISTEN {notify.CHANNEL}")
                    self.listener_pid = conn.info.backend_pid
                    self.listening = True
                    self._connected.set()
                    backoff = 0.2
                    # Whatever committed while nobody listened is unseen: everyone looks again.
                    self._wake_all()
                    async for note in conn.notifies():
                        self._notified(note.payload)
            except asyncio.CancelledError:
                self.listening = False
                raise
            except Exception:
                if self.listening:
                    logger.warning("the notification listener lost its connection; reconnecting", exc_info=True)
                self.listening = False
                self._wake_all()
            self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _notified(self, name: str) -> None:
        """A topic's notification: bump its generation, run each distinct question its waiters
        will ask once, here, and wake them with the answer (a waiter with no question, or on
        several topics, wakes to look for itself). Looking before a crowd wakes means one task
        step per waiter, not two, on the widest fan-outs."""
        with self._lock:
            topic = self._topics.get(name)
            if topic is None:
                return
            topic.generation += 1
            generation = topic.generation
            futures, topic.futures = topic.futures, {}
            # Looks begun before this notification answer nobody any more (a waiter marks the
            # current generation before it looks).
            topic.shared = {}
        loop = asyncio.get_running_loop()
        asked: dict[Hashable, list[asyncio.Future]] = {}
        for future, question in futures.items():
            if future.done():
                continue
            if question is None:
                future.set_result(True)
                continue
            key, read = question
            waiting = asked.get(key)
            if waiting is None:
                waiting = asked[key] = []
                look = loop.run_in_executor(self.executor, _looked, read)
                topic.shared[(key, (topic,))] = ((generation,), look)
                look.add_done_callback(functools.partial(_answer, waiting, generation))
            waiting.append(future)

    def _wake_all(self) -> None:
        with self._lock:
            topics = list(self._topics.values())
            for topic in topics:
                topic.generation += 1
                topic.shared = {}
        for topic in topics:
            futures, topic.futures = topic.futures, {}
            for future in futures:
                if not future.done():
                    future.set_result(True)

    # --- waiting and looking (on the loop) --------------------------------------------------

    async def wait(
        self,
        subscription: Subscription,
        timeout: float,
        *,
        also: asyncio.Future | None = None,
        question: Question | None = None,
    ) -> Any:
        """Until a topic of `subscription` changes since its mark, `timeout` passes or `also`
        is done (then False). Woken by a notification: True, or, for a waiter on one topic that
        says its `question`, the answer (`Answer`) the hub looked up for every waiter asking
        it. While the listener is down, at most DEGRADED_POLL_SECONDS: the caller then looks."""
        if subscription.changed():
            return True
        if not self.listening:
            timeout = min(timeout, DEGRADED_POLL_SECONDS)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        single = len(subscription.topics) == 1
        for topic in subscription.topics:
            topic.futures[future] = question if single else None
        timer = loop.call_later(max(timeout, 0.0), _resolve, future, False)

        def give_up(_: asyncio.Future) -> None:
            _resolve(future, False)

        if also is not None:
            also.add_done_callback(give_up)
        try:
            return await future
        finally:
            timer.cancel()
            if also is not None:
                also.remove_done_callback(give_up)
            for topic in subscription.topics:
                topic.futures.pop(future, None)

    async def look(self, subscription: Subscription, key: Hashable, read: Callable[[], Any]) -> Any:
        """`read()` in the look pool, or the result of one that another waiter asking `key` on
        the same topics began after every notification `subscription` saw at its mark (a look
        that began then has seen every commit those notifications were sent for)."""
        loop = asyncio.get_running_loop()
        if not subscription.topics or not self.listening:
            # Degraded, generations stand still: every poll must read afresh.
            return await loop.run_in_executor(self.executor, _looked, read)
        first = subscription.topics[0]
        # Keyed by the topic objects, not their names: a topic dropped and subscribed again
        # starts its generations anew, and an old look must not pass for a new one.
        shared_key = (key, tuple(subscription.topics))
        entry = first.shared.get(shared_key)
        if (
            entry is None
            or any(began < seen for began, seen in zip(entry[0], subscription.seen, strict=True))
            or (entry[1].done() and (entry[1].cancelled() or entry[1].exception() is not None))
        ):
            if len(first.shared) >= 64:  # drop looks no waiter can use any more
                now = tuple(topic.generation for topic in subscription.topics)
                first.shared = {k: v for k, v in first.shared.items() if not v[1].done() or v[0] == now}
            future = loop.run_in_executor(self.executor, _looked, read)
            entry = first.shared[shared_key] = (tuple(topic.generation for topic in subscription.topics), future)
        return await asyncio.shield(entry[1])


def watch_disconnect(receive: Receive) -> tuple[asyncio.Future, asyncio.Task]:
    """A future done when the client goes away, and the task that watches for it."""
    gone = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        _resolve(gone, True)

    return gone, asyncio.get_running_loop().create_task(watch())


@dataclass(frozen=True)
class Answer:
    """The hub's look for a question: begun at `generation` of the topic (after the notification
    that woke the waiter), done; `result()` gives what it found or raises what it raised."""

    generation: int
    look: asyncio.Future

    def result(self) -> Any:
        return self.look.result()


def _answer(waiting: list[asyncio.Future], generation: int, look: asyncio.Future) -> None:
    answer = Answer(generation, look)
    for future in waiting:
        if not future.done():
            future.set_result(answer)


def _resolve(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _looked(read: Callable[[], Any]) -> Any:
    """A look in a pool thread: it gives its database connection back when it is done."""
    try:
        return read()
    finally:
        connection.close()
