"""The runner's outgoing events: shaped to the API's limits, batched, and delivered in order,
whatever the network or the manager does meanwhile.

- Each event is encoded once, when it is emitted; a payload over 256 KiB is shortened first
  (runner.payloads). A batch holds at most 500 events and its body at most 1 MiB.
- A batch keeps its key until it is delivered: `{runner}:{epoch}:{first}-{last}`, the positions
  of its first and last event among those this sink was given. A retry sends the same bytes under
  the same key, so the manager appends it once; a batch made of other events always has another
  key, since no two batches span the same positions (a replacement adds `-rejected`).
- Connection errors, timeouts, 502, 503, 504, 408 and 429 are retried with backoff for as long as
  the lease is held. A 500 is retried a few times, then taken for a refusal: a server error that
  one event causes every time must not stall the run.
- A refused batch (a 4xx other than lease loss) is split in two, or around the event the error
  names, until the refused events stand alone; each is replaced by a `backend_status` event with
  phase `event-rejected` saying what was lost and why. The rest goes through, in order.
- 409 `runner-lease-conflict` means another runner holds the run: the sink stops (`LeaseLost`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from runner.client import AgentRunClient, ApiError, Backoff
from runner.payloads import MAX_PAYLOAD_BYTES, json_bytes, shorten
from runner.records import JsonObject

logger = logging.getLogger("agentrun.runner")
MAX_BATCH_EVENTS = 500
MAX_BODY_BYTES = 1024 * 1024
MAX_KEY_LENGTH = 200  # the server's limit on a batchKey
SEND_EVENTS = 50  # wake the sender once this many wait; else it sends every SEND_SECONDS
SEND_SECONDS = 0.1
TRANSIENT_STATUSES = {408, 429, 502, 503, 504}
SERVER_ERROR_ATTEMPTS = 5


class LeaseLost(Exception):
    """Another runner holds the run now."""


@dataclass(frozen=True)
class Outgoing:
    """One event, encoded as it goes in a batch (`{"type":..., "payload":...}`)."""

    position: int  # among the events given to the sink, from 0
    type: str
    payload_bytes: int
    data: bytes


def prepare(position: int, event_type: str, payload: JsonObject) -> Outgoing:
    """Encode an event, its payload shortened to the API's limit first when it is over."""
    encoded = json_bytes(payload)
    if len(encoded) > MAX_PAYLOAD_BYTES:
        encoded = json_bytes(shorten(payload))
    data = b'{"type":' + json_bytes(event_type) + b',"payload":' + encoded + b"}"
    return Outgoing(position, event_type, len(encoded), data)


@dataclass(frozen=True)
class Batch:
    events: tuple[Outgoing, ...]
    replacement: bool = False  # an `event-rejected` standing for a refused event

    def key(self, prefix: str) -> str:
        first, last = self.events[0].position, self.events[-1].position
        return f"{prefix}:{first}-{last}" + ("-rejected" if self.replacement else "")

    def split(self, index: object) -> list[Batch]:
        """The batch in parts that each hold fewer events: around the event at `index` when the
        error named one (the 413 of an oversized payload does), else in two halves."""
        events = self.events
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(events):
            parts = [events[:index], events[index : index + 1], events[index + 1 :]]
        else:
            parts = [events[: len(events) // 2], events[len(events) // 2 :]]
        return [Batch(part) for part in parts if part]


class EventSink:
    """Buffers the events of one claim and sends them from one thread, in order.

    `holding()` says whether the lease is still ours to use: while it is, a batch that cannot be
    delivered for now is retried without end; once it is not (a shutdown), a delivery that fails
    is left undone. `lease_lost()` is told when the manager says another runner holds the run.
    """

    def __init__(
        self,
        client: AgentRunClient,
        *,
        run_id: str,
        runner_id: str,
        lease_epoch: int,
        holding: Callable[[], bool] = lambda: True,
        lease_lost: Callable[[], None] = lambda: None,
        server_error_attempts: int = SERVER_ERROR_ATTEMPTS,
    ):
        self.client, self.run_id, self.runner_id, self.lease_epoch = client, run_id, runner_id, lease_epoch
        self.holding, self.lease_lost = holding, lease_lost
        self.server_error_attempts = server_error_attempts
        self.key_prefix = _key_prefix(runner_id, lease_epoch)
        self.buffer: list[Outgoing] = []  # emitted, in no batch yet
        self.pending: deque[Batch] = deque()  # formed and keyed, not yet delivered
        self.emitted = 0
        self.emitting = threading.Lock()  # one emitter at a time, so positions follow the buffer's order
        self.lock = threading.Lock()  # guards the buffer; never held across a request or an encoding
        self.sending = threading.Lock()  # one delivery at a time, so batches stay in order
        self.wake = threading.Event()
        self.retry_now = threading.Event()  # cuts a backoff short (lease lost, shutdown)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="events", daemon=True)
        self.thread.start()

    def emit(self, event_type: str, payload: JsonObject) -> None:
        """Queue an event. Its encoding (and any shortening) is done here, in the emitting thread,
        under a lock of its own: the sender, which only sends, is never kept waiting by it."""
        with self.emitting:
            event = prepare(self.emitted, event_type, payload)
            self.emitted += 1
            with self.lock:
                self.buffer.append(event)
                if len(self.buffer) >= SEND_EVENTS:
                    self.wake.set()

    def undelivered(self) -> int:
        """Events emitted and not yet delivered (nor replaced)."""
        with self.lock:
            pending = list(self.pending)  # a copy: the sender may be changing it
            return len(self.buffer) + sum(len(batch.events) for batch in pending)

    def interrupt(self) -> None:
        """Cut a backoff short, once `holding()` has turned false (the lease was lost, the runner
        is going away)."""
        self.retry_now.set()

    def _loop(self) -> None:
        """Send every SEND_SECONDS, or sooner when SEND_EVENTS wait, until closed or the lease is
        no longer ours (then `close()` tries once more, if the runner still may)."""
        while not self.closed.is_set() and self.holding():
            self.wake.wait(SEND_SECONDS)
            self.wake.clear()
            try:
                if not self.flush():
                    return
            except LeaseLost:
                self.lease_lost()
                return
            except Exception:
                logger.exception("sending events failed; will try again")
                self.closed.wait(1.0)

    def flush(self) -> bool:
        """Deliver everything emitted so far, in order. True when it all went (some of it perhaps
        as `event-rejected`); False when the lease stopped being held first. Raises LeaseLost."""
        with self.sending:
            while True:
                if not self.pending and not self._form_batch():
                    return True
                if not self._deliver(self.pending[0]):
                    logger.warning("run %s: %d events left unsent", self.run_id, self.undelivered())
                    return False

    def close(self) -> bool:
        """Stop the sender thread and deliver what is left (see flush)."""
        self.closed.set()
        self.wake.set()
        self.thread.join(timeout=10)
        return self.flush()

    # --- batches --------------------------------------------------------------------------------

    def _form_batch(self) -> bool:
        """Move the next events from the buffer into a new pending batch: as many as the limits
        allow. False when there are none."""
        with self.lock:
            if not self.buffer:
                return False
            room = MAX_BODY_BYTES - len(self._body(Batch((self.buffer[0],)), b""))
            count, size = 0, 0
            for event in self.buffer[:MAX_BATCH_EVENTS]:
                extra = len(event.data) + (1 if count else 0)
                if count and size + extra > room - 32:  # 32: the last position's digits in the key
                    break
                count, size = count + 1, size + extra
            events, self.buffer = tuple(self.buffer[:count]), self.buffer[count:]
        batch = Batch(events)
        while len(self._body(batch)) > MAX_BODY_BYTES and len(batch.events) > 1:  # a key longer than guessed
            with self.lock:
                self.buffer.insert(0, batch.events[-1])
            batch = Batch(batch.events[:-1])
        self.pending.append(batch)
        return True

    def _body(self, batch: Batch, events: bytes | None = None) -> bytes:
        """The request body, byte for byte the same each time the batch is sent."""
        head = json_bytes(
            {"runnerId": self.runner_id, "leaseEpoch": self.lease_epoch, "batchKey": batch.key(self.key_prefix)}
        )
        if events is None:
            events = b",".join(event.data for event in batch.events)
        return head[:-1] + b',"events":[' + events + b"]}"

    def _deliver(self, batch: Batch) -> bool:
        """Send the first pending batch until it is settled: delivered (then dropped from
        `pending`), or refused (then replaced there by its parts, or its replacement). False when
        the lease stops being held before that."""
        body = self._body(batch)
        backoff = Backoff()
        server_errors = 0
        while True:
            try:
                self.client.request("POST", f"/runs/{self.run_id}/events", content=body, retry=False)
            except httpx.TransportError as error:
                reason = f"{type(error).__name__}: {error}"
            except ApiError as error:
                if error.lease_lost:
                    raise LeaseLost from None
                transient = error.status in TRANSIENT_STATUSES
                if not transient and error.status >= 500:
                    server_errors += 1
                    transient = server_errors < self.server_error_attempts
                if not transient:
                    self._refused(batch, error)
                    return True
                reason = str(error)
            else:
                self.pending.popleft()
                return True
            if not self.holding():
                return False
            delay = backoff.next()
            logger.warning(
                "run %s: sending %d events failed (%s); again in %.1f s", self.run_id, len(batch.events), reason, delay
            )
            self.retry_now.wait(delay)
            if not self.holding():
                return False

    def _refused(self, batch: Batch, error: ApiError) -> None:
        self.pending.popleft()
        if len(batch.events) > 1:
            details = error.details if isinstance(error.details, dict) else {}
            self.pending.extendleft(reversed(batch.split(details.get("index"))))
            return
        [event] = batch.events
        if batch.replacement:
            logger.error(
                "run %s: the manager refused even the notice of a rejected %s event: %s", self.run_id, event.type, error
            )
            return
        logger.error(
            "run %s: the manager refused a %s event of %d bytes: %s",
            self.run_id,
            event.type,
            event.payload_bytes,
            error,
        )
        notice = prepare(
            event.position,
            "backend_status",
            {
                "phase": "event-rejected",
                "eventType": event.type,
                "bytes": event.payload_bytes,
                "errorKind": error.kind,
                "status": error.status,
                "message": (error.message or "")[:200],
            },
        )
        self.pending.appendleft(Batch((notice,), replacement=True))


def _key_prefix(runner_id: str, lease_epoch: int) -> str:
    """`{runner}:{epoch}`, the runner id hashed when it would leave too little of the key's 200
    characters for the positions (or could not be part of an identifier at all)."""
    if len(runner_id) > MAX_KEY_LENGTH - 80 or not runner_id.isprintable():
        runner_id = "runner-" + hashlib.sha256(runner_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{runner_id}:{lease_epoch}"
