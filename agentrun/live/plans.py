"""Plans: what a view that waits answers with (`LongPoll`, `Stream`), and what the loop then runs
(`Serving`); under plain WSGI the same plans run in the request's thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from agentrun import metrics, notify
from agentrun.live.hub import (
    ENVIRON_KEY,
    Answer,
    Fetch,
    Receive,
    Render,
    Send,
    Subscription,
    closed_on_purpose,
    watch_disconnect,
)

logger = logging.getLogger(__name__)


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

    def over(self, position: Hashable) -> bool:
        """Asked once, when a stream's first look found nothing: whether nothing will ever come
        after `position` (a finished run resumed past its end). Later looks need not ask: a
        stream that was live sees its feed's end in a look (`Look.done`)."""
        return False


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
        gone, watcher = watch_disconnect(receive)
        metrics.WAITERS_OPEN.inc()
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
            metrics.WAITERS_OPEN.dec()
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
        gone, watcher = watch_disconnect(receive)
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
        metrics.STREAMS_OPEN.inc()
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
            metrics.STREAMS_OPEN.dec()
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
        over = not first.frames and not first.done and feed.over(position)
    except BaseException:
        if subscription is not None:
            subscription.release()
        raise
    notify.release_connection()
    if over:
        if subscription is not None:
            subscription.release()
        return HttpResponse(status=204)
    return Stream(subscription, feed=feed, first=first, cursor=feed.cursor(position))
