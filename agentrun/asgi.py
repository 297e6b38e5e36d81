"""The ASGI application the server runs (gunicorn.conf.py: uvicorn's worker, `agentrun.server`).

Every request goes to Django, in a pool of `AGENTRUN_WEB_THREADS` threads, in one hand-off each
way: the body is read on the loop first (up to the body limit), and the answer comes back whole.
A view that waits answers with a plan (`agentrun.live`), which the loop carries out holding no
thread. The loop also runs the process's LISTEN connection (`LiveHub`), from startup (lifespan)
to shutdown.

Production settings unless told otherwise, as `agentrun.wsgi`.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.prod")
django.setup(set_prefix=False)

from django.conf import settings  # noqa: E402 - after django.setup()
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402

from agentrun import live, logs, notify  # noqa: E402
from agentrun.live import Message, Receive, Send  # noqa: E402
from agentrun.middleware import LOG_FIELDS_KEY  # noqa: E402

logger = logging.getLogger(__name__)
# A request body that stops arriving for this long is given up (its thread is not held for ever).
BODY_READ_SECONDS = 30.0


class _StreamedInput:
    """`wsgi.input` for a body not read ahead (over the limit, or chunked): each read asks the
    loop for more, from the request's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, receive: Receive) -> None:
        self.loop, self.receive = loop, receive
        self.buffer = bytearray()
        self.more = True

    def _fill(self) -> None:
        try:
            message: Message = asyncio.run_coroutine_threadsafe(_coroutine(self.receive), self.loop).result(
                BODY_READ_SECONDS
            )
        except TimeoutError:
            self.more = False
            raise OSError(f"the client sent nothing of its body for {BODY_READ_SECONDS:.0f} s") from None
        if message["type"] == "http.disconnect":
            self.more = False
            raise OSError("the client went away")
        self.buffer += message.get("body", b"")
        self.more = message.get("more_body", False)

    def read(self, size: int = -1) -> bytes:
        while self.more and (size < 0 or len(self.buffer) < size):
            self._fill()
        if size < 0:
            size = len(self.buffer)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def readline(self, size: int = -1) -> bytes:
        while self.more and b"\n" not in self.buffer and (size < 0 or len(self.buffer) < size):
            self._fill()
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        if size >= 0:
            end = min(end, size)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data


async def _coroutine(receive: Receive) -> Message:
    return await receive()


def _environ(scope: Message, body: io.BytesIO | _StreamedInput) -> dict[str, Any]:
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root) :]  # uvicorn's path includes the root path; WSGI's PATH_INFO does not
    query = scope["query_string"].decode("latin-1")
    raw_path = scope.get("raw_path") or path.encode()
    server = scope.get("server") or ("localhost", 80)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.encode().decode("latin-1"),
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": query,
        # The path as sent, %2F and all (agentrun.middleware.RawPathMiddleware reads it).
        "RAW_URI": raw_path.decode("latin-1") + (f"?{query}" if query else ""),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] or 0),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1")
        if "_" in name:
            continue  # X_Forwarded_For would pass for X-Forwarded-For (gunicorn drops these too)
        value = raw_value.decode("latin-1")
        if name == "content-length":
            key = "CONTENT_LENGTH"
        elif name == "content-type":
            key = "CONTENT_TYPE"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class Application:
    def __init__(self) -> None:
        self.django = WSGIHandler()
        self.executor = ThreadPoolExecutor(
            max_workers=int(os.environ.get("AGENTRUN_WEB_THREADS", "64")), thread_name_prefix="agentrun-web"
        )
        self.hub = live.LiveHub(look_threads=int(os.environ.get("AGENTRUN_LOOK_THREADS", "8")))
        self.read_ahead = int(settings.AGENTRUN_MAX_BODY_BYTES)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        else:  # websocket: not served
            await send({"type": "websocket.close", "code": 1000})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not getattr(settings, "AGENTRUN_DATABASE_MISSING", False):
                    await self.hub.start(notify.conninfo())
                # What is loaded now (Django, the apps) lives as long as the process: the
                # collector need not walk it again each time, with thousands of streams open.
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.hub.stop()
                self.executor.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Message, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        body = await self._body(scope, receive, loop)
        if body is None:
            return  # the client went away while sending its body: nobody to answer
        environ = _environ(scope, body)
        environ[live.ENVIRON_KEY] = self.hub
        answer = await loop.run_in_executor(self.executor, self._django, environ)
        # This request's task: its access line (logged as the answer starts) carries the request's fields.
        logs.bind(**environ.get(LOG_FIELDS_KEY, {}))
        if isinstance(answer, live.Serving):
            del environ, body  # a stream may live for an hour: keep only what it needs
            if scope["method"] == "HEAD":
                await answer.head_only(send)
            else:
                await answer.serve(send, receive)
            return
        status, headers, content = answer
        if scope["method"] == "HEAD":
            content = b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _body(
        self, scope: Message, receive: Receive, loop: asyncio.AbstractEventLoop
    ) -> io.BytesIO | _StreamedInput | None:
        """The body, read here when its length is known and within the limit; else a stream the
        request's thread reads (the body-limit middleware drains an oversized one)."""
        length = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked or (length is not None and length > self.read_ahead):
            return _StreamedInput(loop, receive)
        if not length:
            return io.BytesIO(b"")
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return io.BytesIO(b"".join(chunks))

    def _django(self, environ: dict[str, Any]) -> live.Serving | tuple[int, list[tuple[bytes, bytes]], bytes]:
        """In a web thread: Django's answer, whole, or the plan of a view that waits."""
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
            started[:] = [status, headers]

        response = self.django(environ, start_response)  # type: ignore[arg-type]  # Django's stubs: a narrower start_response
        if isinstance(response, live.Plan):
            serving = response.serving()  # the wait is the loop's now
            response.close()  # the request is done with Django (request_finished)
            return serving
        try:
            content = b"".join(response)
        finally:
            response.close()
        status, headers = started
        code = int(status.split(" ", 1)[0]) if status else HTTPStatus.INTERNAL_SERVER_ERROR
        return code, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers], content


application = Application()
