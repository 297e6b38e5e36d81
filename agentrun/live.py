"""Waiting on the event loop: SSE streams and `wait=` long-polls hold no thread and no database
connection while they wait.

The server (`agentrun.asgi`) runs Django's views in threads. A view that would wait returns a
*plan* instead of blocking: a `LongPoll` or a `Stream`, both responses Django's middleware
treats like any other. The loop then carries the plan out. It parks the request on topics of
the process's one LISTEN connection (`LiveHub`); a notification bumps a topic's generation and
wakes its waiters; each runs its next look in a small thread pool, shared by every waiter that
asks the same question since that notification (a thousand followers of one run cost one
query and one rendering), and writes the answer.

Topics are subscribed *before* the look they guard, and a look counts only if it began after
the notification a waiter woke for (a notification is sent at commit), so nothing committed is
missed. When the LISTEN connection drops, every waiter looks again once it is back, and while
it is down they look every `DEGRADED_POLL_SECONDS`.

Under a plain WSGI server (Django's test client, `runserver`) the same plans run in the request's
thread and wait on `agentrun.notify`'s thread hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

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


@dataclass(frozen=True)
class Look:
    """What a stream's look found after its position: `frames` to write, the position after
    them, whether the stream is over, whether a full page was read (look again at once), and
    the topics whose notifications the next look answers."""

    frames: bytes
    position: Hashable
    done: bool
    more: bool
    topics: tuple[str, ...]


class Feed:
    """A stream's source, implemented by the app that owns the rows. `read` runs in a thread,
    must depend on nothing but `position` (waiters share its result), and is called with no
    transaction open."""

    def read(self, position: Hashable) -> Look:
        raise NotImplementedError

    def topics(self, position: Hashable) -> tuple[str, ...]:
        """The topics whose notifications may change what `read(position)` finds."""
        raise NotImplementedError

    def share_key(self, position: Hashable) -> Hashable:
        """Streams whose feeds give equal keys read equal bytes at equal positions."""
        raise NotImplementedError

    def cursor(self, position: Hashable) -> str | None:
        """`position` as an event id (what Last-Event-ID resumes from), or None."""
        raise NotImplementedError


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


def _watch_disconnect(receive: Receive) -> tuple[asyncio.Future, asyncio.Task]:
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


# --- plans -----------------------------------------------------------------------------------


class Serving:
    """What the loop runs for a plan, holding only what the wait needs (not the Django
    response, its request or its headers' objects: a stream may live for an hour)."""

    __slots__ = ("headers", "status", "subscription")

    def __init__(self, subscription: Subscription | None, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.subscription, self.status, self.headers = subscription, status, headers

    async def serve(self, send: Send, receive: Receive) -> None:
        raise NotImplementedError

    async def head_only(self, send: Send) -> None:
        """A HEAD request: the answer's head, at once, and nothing to wait for."""
        self.end()
        headers = [(k, v) for k, v in self.headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def end(self) -> None:
        if self.subscription is not None:
            self.subscription.release()
            self.subscription = None


class Plan(StreamingHttpResponse):
    """A response the server carries out on its loop (`serving()`), or, under plain WSGI, in
    the request's thread (iterating it)."""

    def __init__(self, subscription: Subscription | None, *, content_type: str) -> None:
        super().__init__(self._in_thread(), content_type=content_type)
        self.subscription = subscription

    def serving(self) -> Serving:
        """Hand the wait to the loop (in the request's thread, before the response is closed):
        the response no longer owns the subscription."""
        raise NotImplementedError

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end()

    def end(self) -> None:
        if self.subscription is not None:
            self.subscription.release()
            self.subscription = None

    def _handed_over(self) -> Subscription | None:
        subscription, self.subscription = self.subscription, None
        return subscription

    def _in_thread(self) -> Iterator[bytes]:
        raise NotImplementedError
        yield b""  # a generator


def _headers(response: HttpResponseBase) -> list[tuple[bytes, bytes]]:
    headers = [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in response.items()]
    for cookie in response.cookies.values():
        headers.append((b"set-cookie", cookie.output(header="").strip().encode("latin-1")))
    return headers


def _seconds(name: str, floor: float = 0.05) -> float:
    """A duration setting, kept above `floor` (0 would spin a loop)."""
    return max(float(getattr(settings, name)), floor)


class LongPoll(Plan):
    """An empty first look: wait for the topic until `deadline`, look again at each notification
    (shared among waiters of one `share_key`), answer with `render(found)`."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        deadline: float,
        fetch: Fetch,
        share_key: Hashable,
        render: Render,
        topic: str,
    ) -> None:
        super().__init__(subscription, content_type="application/json")
        # (Not `render`: Django calls a response's `render()`, as for a TemplateResponse.)
        self.deadline, self.fetch, self.share_key, self.topic = deadline, fetch, share_key, topic
        self.render_body = render

    def serving(self) -> Serving:
        headers = [(k, v) for k, v in _headers(self) if k not in (b"content-length", b"transfer-encoding")]
        return _LongPollServing(self._handed_over(), self.status_code, headers, self)

    def _in_thread(self) -> Iterator[bytes]:
        raise RuntimeError("a long-poll plan is made only for the event loop (agentrun.asgi)")
        yield b""


class _LongPollServing(Serving):
    __slots__ = ("deadline", "fetch", "render", "share_key", "topic")

    def __init__(
        self, subscription: Subscription | None, status: int, headers: list[tuple[bytes, bytes]], plan: LongPoll
    ) -> None:
        super().__init__(subscription, status, headers)
        self.deadline, self.fetch, self.render = plan.deadline, plan.fetch, plan.render_body
        self.share_key, self.topic = plan.share_key, plan.topic

    def _look(self) -> tuple[Any, bytes | None]:
        found = self.fetch()
        return found, self.render(found) if found else None

    async def serve(self, send: Send, receive: Receive) -> None:
        subscription = self.subscription
        body = None
        gone, watcher = _watch_disconnect(receive)
        try:
            if subscription is None:
                raise RuntimeError("a long-poll without a subscription")
            hub = subscription.hub
            while body is None and not gone.done():
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    break
                woke = await hub.wait(subscription, remaining, also=gone, question=(self.share_key, self._look))
                if isinstance(woke, Answer):
                    subscription.seen = [woke.generation]
                    with contextlib.suppress(Exception):  # a failed shared look: look for ourselves
                        _found, body = woke.result()
                        continue
                elif not woke and hub.listening:
                    continue  # the deadline or the client gone (the loop ends), or a poll while degraded
                subscription.mark()
                _found, body = await hub.look(subscription, self.share_key, self._look)
        except Exception:
            logger.warning("long-poll on %s failed while waiting; answering with no items", self.topic, exc_info=True)
            body = None
        finally:
            watcher.cancel()
            self.end()
        if gone.done():
            return  # nobody to answer
        if body is None:
            body = self.render(None)
        headers = [*self.headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def long_poll(
    request: HttpRequest, topic: str, *, timeout: float, fetch: Fetch, share_key: Hashable, render: Render
) -> HttpResponseBase:
    """Answer with `render(fetch())` as soon as `fetch()` is non-empty, or after `timeout` with
    `render(None)` ("nothing yet"). Waiters with the same `share_key` share each wake-up's look."""
    hub = request.META.get(ENVIRON_KEY)
    if hub is None or timeout <= 0:
        return notify.long_poll(topic, timeout=timeout, fetch=fetch, share_key=share_key, render=render)
    deadline = time.monotonic() + timeout
    subscription = hub.subscribe((topic,))
    try:
        found = fetch()
    except BaseException:
        subscription.release()
        raise
    if found:
        subscription.release()
        return HttpResponse(render(found), content_type="application/json")
    notify.release_connection()
    return LongPoll(subscription, deadline=deadline, fetch=fetch, share_key=share_key, render=render, topic=topic)


# --- server-sent events ----------------------------------------------------------------------

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
KEEPALIVE = b": keepalive\n\n"


def sse_frame(event_id: str, event: str, data: bytes) -> bytes:
    """One SSE event. `data` is one line of JSON (JSON escapes CR and LF inside strings)."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), event.encode(), data)


def stream_head(cursor: str | None) -> bytes:
    """A stream's first block: the reconnect delay, and the cursor it starts from as its id (no
    data, so no event: a client that drops before the first event resumes from there, not from
    wherever the feed would start by then)."""
    retry = b"retry: %d\n" % int(settings.AGENTRUN_STREAM_RETRY_MS)
    return retry + (b"id: %s\n\n" % cursor.encode() if cursor is not None else b"\n")


class Stream(Plan):
    """An SSE stream of `feed` from `position`: the first look's frames at once, then a look at
    each notification of its topics, a comment every heartbeat, until the feed is done.

    A client that takes nothing for `AGENTRUN_STREAM_STALL_SECONDS` while the server has frames
    for it is closed: a stream holds at most one page and the socket's write buffer, and the
    client resumes from the last id it read."""

    def __init__(self, subscription: Subscription | None, *, feed: Feed, first: Look, cursor: str | None) -> None:
        super().__init__(subscription, content_type=SSE_CONTENT_TYPE)
        self.feed, self.first, self.cursor = feed, first, cursor
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once

    def serving(self) -> Serving:
        headers = [(k, v) for k, v in _headers(self) if k != b"content-length"]
        return _StreamServing(self._handed_over(), headers, self.feed, self.first, self.cursor)

    def _in_thread(self) -> Iterator[bytes]:
        """Plain WSGI: the same stream, holding this thread while it waits."""
        look = self.first
        yield stream_head(self.cursor) + look.frames
        heartbeat = _seconds("AGENTRUN_STREAM_HEARTBEAT_SECONDS")
        ends_at = time.monotonic() + float(settings.AGENTRUN_STREAM_MAX_SECONDS)
        waiters: dict[str, Any] = {}
        try:
            while not look.done and time.monotonic() < ends_at:
                added = False
                for name in look.topics:
                    if name not in waiters:
                        waiters[name], added = notify.hub.add_waiter(name), True
                for name in [n for n in waiters if n not in look.topics]:
                    notify.hub.remove_waiter(waiters.pop(name))
                # A topic subscribed after the look that named it: look again before waiting.
                if not look.more and not added:
                    deadline = min(time.monotonic() + heartbeat, ends_at)
                    woke = False
                    while not woke and time.monotonic() < deadline:
                        woke = any(notify.hub.wait(w, 0.05) for w in waiters.values())
                    if not woke:
                        if time.monotonic() < ends_at:
                            yield KEEPALIVE
                        continue
                look = self.feed.read(look.position)
                notify.release_connection()
                if look.frames:
                    yield look.frames
        finally:
            for waiter in waiters.values():
                notify.hub.remove_waiter(waiter)


class _StreamServing(Serving):
    __slots__ = ("cursor", "feed", "first")

    def __init__(
        self,
        subscription: Subscription | None,
        headers: list[tuple[bytes, bytes]],
        feed: Feed,
        first: Look,
        cursor: str | None,
    ) -> None:
        super().__init__(subscription, 200, headers)
        self.feed, self.first, self.cursor = feed, first, cursor

    async def serve(self, send: Send, receive: Receive) -> None:
        subscription = self.subscription
        if subscription is None:
            raise RuntimeError("a stream without a subscription is served in its thread")
        hub = subscription.hub
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        stall = _seconds("AGENTRUN_STREAM_STALL_SECONDS")
        heartbeat = _seconds("AGENTRUN_STREAM_HEARTBEAT_SECONDS")
        # A stream ends cleanly after this long; its client reconnects (and may land on another worker).
        ends_at = loop.time() + float(settings.AGENTRUN_STREAM_MAX_SECONDS)
        gone, watcher = _watch_disconnect(receive)
        writing = hub.writing

        async def write(body: bytes, more: bool = True) -> None:
            message = {"type": "http.response.body", "body": body, "more_body": more}
            if task is None:
                await send(message)
                return
            writing[task] = loop.time()  # the watchdog cancels a write that waits too long
            try:
                await send(message)
            finally:
                writing.pop(task, None)

        look, self.first = self.first, _EMPTY  # served: not kept for the stream's life
        feed = self.feed
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            self.headers = []
            await write(stream_head(self.cursor) + look.frames)
            # The first heartbeat comes a little early, by a random amount: streams opened
            # together (a reconnect wave) do not all beat together ever after.
            written = loop.time() - random.uniform(0, heartbeat / 3)  # noqa: S311 - spreading, not a secret
            while not look.done and not gone.done() and loop.time() < ends_at:
                must_look = subscription.follow(look.topics) or look.more
                if not must_look:
                    left = min(heartbeat - (loop.time() - written), ends_at - loop.time())
                    position = look.position
                    question = (feed.share_key(position), functools.partial(feed.read, position))
                    woke = left > 0 and await hub.wait(subscription, left, also=gone, question=question)
                    if gone.done():
                        break
                    if isinstance(woke, Answer):  # the hub looked for every stream asking the same
                        subscription.seen = [woke.generation]
                        try:
                            look = woke.result()
                        except Exception:  # noqa: BLE001 - a failed shared look: look for ourselves
                            must_look = True
                        else:
                            if look.frames:
                                await write(look.frames)
                                written = loop.time()
                            continue
                    must_look = must_look or woke is True or not hub.listening
                    if not must_look:
                        if loop.time() >= ends_at:
                            break
                        await write(KEEPALIVE)
                        written = loop.time()
                        continue
                subscription.mark()
                position = look.position
                look = await hub.look(subscription, feed.share_key(position), functools.partial(feed.read, position))
                if look.frames:
                    await write(look.frames)
                    written = loop.time()
                elif loop.time() - written >= heartbeat:
                    await write(KEEPALIVE)
                    written = loop.time()
            if not gone.done():
                await write(b"", more=False)
        except asyncio.CancelledError:
            if task is None or task not in hub.stalled:
                raise
            hub.stalled.discard(task)
            task.uncancel()
            closed_on_purpose.set(True)
            logger.info("closed a stream whose client took nothing for %.0f s; it resumes from its last id", stall)
        except Exception:
            closed_on_purpose.set(True)  # the client resumes from the last id it read
            logger.warning("a stream failed while serving; closing it", exc_info=True)
        finally:
            watcher.cancel()
            self.end()


_EMPTY = Look(b"", None, True, False, ())


def stream(request: HttpRequest, feed: Feed, position: Hashable) -> HttpResponseBase:
    """An SSE response of `feed` from `position`; the first look is made here, in the view.
    A feed that is over with nothing to send (a finished run resumed past its end) answers 204
    No Content, which tells SSE clients not to reconnect; a stream that ends any other way
    without being done (its time is up) is one they reconnect to."""
    hub = request.META.get(ENVIRON_KEY)
    subscription = hub.subscribe(feed.topics(position)) if hub is not None else None  # before the look
    try:
        first = feed.read(position)
    except BaseException:
        if subscription is not None:
            subscription.release()
        raise
    notify.release_connection()
    if first.done and not first.frames:
        if subscription is not None:
            subscription.release()
        return HttpResponse(status=204)
    return Stream(subscription, feed=feed, first=first, cursor=feed.cursor(position))
