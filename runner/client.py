"""The agentrun client SDK: every client and runner call of the v1 API, over httpx.

Transient failures (connection errors, timeouts, 502, 503, 504) are retried with exponential
backoff and jitter: `retries` times, or, while `retry_while` says so, for as long as it takes (a
runner holding a lease waits out an outage rather than dropping the run). Every call retried is
safe to repeat: runs and commands carry idempotency keys, event batches a batch key, and the
runner calls return the record unchanged once it is terminal.

Bodies are encoded by runner.payloads.json_bytes, not by httpx: text with a lone surrogate (which
agents can print) cannot be UTF-8, and httpx would fail on it rather than send it escaped.
"""

from __future__ import annotations

import json as jsonlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, SSEError

from runner.payloads import json_bytes
from runner.records import Command, Event, JsonObject, Listing, Page, Run

QueryParams = Mapping[str, str | int | float]

RETRY_STATUSES = {502, 503, 504}
DEFAULT_TIMEOUT = 40.0  # above the longest long-poll (30 s)


class Backoff:
    """Delays for retries: from `first` seconds, doubling to `cap`, each drawn at random from
    the upper half of its step so that runners retrying together spread out."""

    def __init__(self, first: float = 0.2, cap: float = 10.0):
        self.step, self.cap = first, cap

    def next(self) -> float:
        delay = random.uniform(self.step / 2, self.step)  # noqa: S311 - jitter, not a secret
        self.step = min(self.step * 2, self.cap)
        return delay


class ApiError(Exception):
    """The API answered with an error envelope (or something that is not one)."""

    def __init__(self, status: int, kind: str, message: str, details: JsonObject | None = None):
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message, self.details = status, kind, message, details or {}

    @property
    def lease_lost(self) -> bool:
        return self.status == 409 and self.kind == "runner-lease-conflict"


class AgentRunClient:
    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        retries: int = 6,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/api/v1"):
            self.base_url += "/api/v1"
        self.retries = retries
        self.retry_while: Callable[[], bool] | None = None
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers={"Authorization": f"Bearer {key}"}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AgentRunClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: QueryParams | None = None,
        content: bytes | None = None,
        retry: bool = True,
    ) -> JsonObject:
        """The answer's JSON, or ApiError. `content` is a body already encoded (JSON); with
        `retry=False`, one attempt, whose transport error is raised as it is."""
        if json is not None:
            content = json_bytes(json)
        headers = {"Content-Type": "application/json"} if content is not None else None
        backoff = Backoff()
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, content=content, params=params, headers=headers)
            except httpx.TransportError:
                if not self._again(retry, attempt):
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or not self._again(retry, attempt):
                    return self._body(response)
            attempt += 1
            time.sleep(backoff.next())

    def _again(self, retry: bool, attempt: int) -> bool:
        if not retry:
            return False
        if self.retry_while is not None and self.retry_while():
            return True
        return attempt < self.retries

    @staticmethod
    def _body(response: httpx.Response) -> JsonObject:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = (body or {}).get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                raise ApiError(
                    response.status_code, error.get("kind", "unknown"), error.get("message", ""), error.get("details")
                )
            raise ApiError(response.status_code, "unknown", response.text[:200])
        return cast(JsonObject, body)  # every answer of the API is an object

    # --- clients ---------------------------------------------------------------------------

    def create_run(
        self,
        *,
        backend_profile: str,
        session_id: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,  # the run's other fields, as API.md names them
    ) -> Run:
        body = {"backendProfile": backend_profile, "idempotencyKey": idempotency_key or uuid.uuid4().hex, **fields}
        if session_id:
            body["sessionRef"] = {"sessionId": session_id, **body.get("sessionRef", {})}
        return cast(Run, self.request("POST", "/runs", json=body))

    def get_run(self, run_id: str) -> Run:
        return cast(Run, self.request("GET", f"/runs/{run_id}"))

    def cancel_run(self, run_id: str, reason: str | None = None) -> Run:
        return cast(Run, self.request("POST", f"/runs/{run_id}/cancel", json={"reason": reason} if reason else {}))

    def send_command(
        self, run_id: str, command_type: str, payload: JsonObject, *, idempotency_key: str | None = None
    ) -> Command:
        body = {"type": command_type, "payload": payload, "idempotencyKey": idempotency_key or uuid.uuid4().hex}
        return cast(Command, self.request("POST", f"/runs/{run_id}/commands", json=body))

    def send_turn(self, run_id: str, prompt: str, *, idempotency_key: str | None = None) -> Command:
        return self.send_command(run_id, "turn", {"prompt": prompt}, idempotency_key=idempotency_key)

    def events(self, run_id: str, *, after_seq: int = 0, limit: int = 500, wait: float = 0) -> Page[Event]:
        params = {"afterSeq": after_seq, "limit": limit, "wait": wait}
        return cast(Page[Event], self.request("GET", f"/runs/{run_id}/events", params=params))

    def follow_events(self, run_id: str, *, after_seq: int = 0, until_terminal: bool = True) -> Iterator[Event]:
        """Every event from `after_seq` on, as it is appended, by long-polls; ends after
        `terminal_status`. (`stream_events` does the same over one stream.)"""
        while True:
            page = self.events(run_id, after_seq=after_seq, wait=30)
            for event in page["items"]:
                yield event
                if until_terminal and event["type"] == "terminal_status":
                    return
            after_seq = int(page["cursor"])

    def stream_events(
        self, run_id: str, *, after_seq: int = 0, view: str = "trace", until_terminal: bool = True
    ) -> EventStream:
        """The run's events from `after_seq` on as they are appended, over one SSE stream that
        resumes by itself from the last id read (nothing skipped, nothing repeated); ends after
        `terminal_status`. `view`: trace (every event), output or control (what a runner acts
        on). Falls back to long-polls where the server has no stream. Iterate it; `close()`
        ends it from any thread."""
        return EventStream(
            self,
            f"/runs/{run_id}/events/stream",
            {"view": view},
            str(after_seq),
            run_id=run_id,
            until_terminal=until_terminal,
        )

    def stream_session_output(self, session_id: str, *, last_event_id: str | None = None) -> EventStream:
        """A session's output events, run after run, as they are appended (SSE, resumed by
        itself); never ends by itself: `close()` it or stop iterating. `last_event_id`
        (`runId:seq`) resumes after that event."""
        path = f"/sessions/{quote(session_id, safe='')}/output/stream"
        return EventStream(self, path, {}, last_event_id, until_terminal=False)

    def sessions(self, **params: str | int | None) -> Listing:
        """The inbox; query parameters as API.md names them (None: not sent)."""
        query = {k: v for k, v in params.items() if v is not None}
        return cast(Listing, self.request("GET", "/sessions", params=query))

    def queue_tasks(self, **params: str | int | None) -> Listing:
        """Queue tasks; query parameters as API.md names them (None: not sent)."""
        query = {k: v for k, v in params.items() if v is not None}
        return cast(Listing, self.request("GET", "/queue-tasks", params=query))

    def create_queue_task(self, **body: Any) -> JsonObject:  # the task's fields, as API.md names them
        return self.request("POST", "/queue-tasks", json=body)

    # --- runners ---------------------------------------------------------------------------

    def claim(self, run_id: str, runner_id: str, lease_ms: int) -> Run:
        body = {"runnerId": runner_id, "leaseMs": lease_ms}
        return cast(Run, self.request("POST", f"/runs/{run_id}/claim", json=body))

    def heartbeat(self, run_id: str, runner_id: str, lease_epoch: int, lease_ms: int, *, retry: bool = True) -> Run:
        body = {"runnerId": runner_id, "leaseEpoch": lease_epoch, "leaseMs": lease_ms}
        return cast(Run, self.request("POST", f"/runs/{run_id}/heartbeat", retry=retry, json=body))

    def append_events(
        self, run_id: str, runner_id: str, lease_epoch: int, events: list[JsonObject], batch_key: str
    ) -> JsonObject:
        """One batch as given. The runner sends through runner.sink, which shapes and splits batches
        to the API's limits."""
        return self.request(
            "POST",
            f"/runs/{run_id}/events",
            json={"runnerId": runner_id, "leaseEpoch": lease_epoch, "batchKey": batch_key, "events": events},
        )

    def commands(self, run_id: str, *, after_seq: int = 0, wait: float = 0) -> Page[Command]:
        params = {"afterSeq": after_seq, "wait": wait}
        return cast(Page[Command], self.request("GET", f"/runs/{run_id}/commands", params=params))

    def ack(self, command_id: str, runner_id: str, lease_epoch: int) -> Command:
        body = {"runnerId": runner_id, "leaseEpoch": lease_epoch}
        return cast(Command, self.request("POST", f"/commands/{command_id}/ack", json=body))

    def finish_command(self, command_id: str, runner_id: str, lease_epoch: int, **result: str | None) -> Command:
        """`result`: terminalStatus, failureKind, failureMessage, threadId, turnId (None: not sent)."""
        body = {"runnerId": runner_id, "leaseEpoch": lease_epoch, **_compact(result)}
        return cast(Command, self.request("POST", f"/commands/{command_id}/finish", json=body))

    def finish_run(self, run_id: str, runner_id: str, lease_epoch: int, **result: str | None) -> Run:
        """`result`: as for finish_command."""
        body = {"runnerId": runner_id, "leaseEpoch": lease_epoch, **_compact(result)}
        return cast(Run, self.request("POST", f"/runs/{run_id}/finish", json=body))


class EventStream:
    """An SSE stream of events that reconnects with `Last-Event-ID` after a drop (waiting the
    server's `retry:` hint, longer after repeated failures) and so yields every event once.
    An error answer before the stream starts is raised as ApiError, except that a server
    without the stream route (404 `schema-invalid` naming no object, 405, 406) is followed by
    long-polls instead, for a run stream."""

    def __init__(
        self,
        client: AgentRunClient,
        path: str,
        params: Mapping[str, str],
        last_id: str | None,
        *,
        run_id: str | None = None,
        until_terminal: bool = True,
    ) -> None:
        self.client, self.path, self.params, self.last_id = client, path, dict(params), last_id
        self.run_id, self.until_terminal = run_id, until_terminal
        self.connections = 0  # streams opened (the first, then one per reconnect)
        self.polling = False  # True once it fell back to long-polls
        self._closed = threading.Event()
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            response = self._response
        if response is not None:
            response.close()

    def __iter__(self) -> Iterator[Event]:
        retry, backoff = 2.0, Backoff(first=0.5)
        while not self._closed.is_set():
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id
            opened, ended_cleanly = time.monotonic(), False
            try:
                with self.client.http.stream("GET", self.path, params=self.params, headers=headers) as response:
                    with self._lock:
                        self._response = response
                    if self._closed.is_set():
                        return
                    self.connections += 1
                    if response.status_code == 204:
                        return  # over: a finished run resumed past its end
                    if response.status_code != 200:
                        response.read()
                        if self._no_stream_route(response) and self.run_id is not None:
                            yield from self._long_polls()
                            return
                        if response.status_code in RETRY_STATUSES:
                            raise httpx.RemoteProtocolError(f"{response.status_code} from the server")
                        AgentRunClient._body(response)  # raises ApiError
                    for sse in EventSource(response).iter_sse():
                        if sse.retry is not None:
                            retry = sse.retry / 1000.0
                        self.last_id = sse.id or self.last_id  # the head's id too: where the stream began
                        if not sse.data:
                            continue
                        event = cast(Event, jsonlib.loads(sse.data))
                        backoff = Backoff(first=0.5)
                        yield event
                        if self.until_terminal and event.get("type") == "terminal_status":
                            return
                    ended_cleanly = True  # the server ended it (its time was up): come back at once
            except (httpx.TransportError, SSEError):
                if self._closed.is_set():
                    return
            finally:
                with self._lock:
                    self._response = None
            if ended_cleanly and time.monotonic() - opened >= 0.2:
                continue
            # A drop, or a stream that ends as soon as it opens: wait the server's hint (or longer,
            # after repeated failures), spread out so that clients of a restarted server do not
            # all come back at the same moment.
            if self._closed.wait(max(retry, backoff.next()) * random.uniform(1.0, 1.5)):  # noqa: S311 - jitter
                return

    @staticmethod
    def _no_stream_route(response: httpx.Response) -> bool:
        """The server has no such route (an older server, or a proxy in the way)."""
        if response.status_code in (405, 406):
            return True
        if response.status_code != 404:
            return False
        try:
            message = str((response.json().get("error") or {}).get("message", ""))
        except (ValueError, AttributeError):
            return True
        return message.startswith("no route")

    def _long_polls(self) -> Iterator[Event]:
        self.polling = True
        run_id = str(self.run_id)
        after_seq = int(self.last_id or 0) if str(self.last_id or "0").isdigit() else 0
        while not self._closed.is_set():
            page = self.client.events(run_id, after_seq=after_seq, wait=30)
            for event in page["items"]:
                self.last_id = str(event["seq"])
                yield event
                if self.until_terminal and event["type"] == "terminal_status":
                    return
            after_seq = int(page["cursor"])


def _compact(result: Mapping[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in result.items() if value is not None}
