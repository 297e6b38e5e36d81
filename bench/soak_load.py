"""The soak's traffic: an HTTP client that records every answer, and the flows the client threads
play (runs with echo turns, steers and cancels, queue tasks, racing idempotent creates, and runs
the soak drives itself as a runner, recording every event a 2xx acknowledged)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote

import httpx
from soak_checks import AckedEvent, Acknowledged, Claim, Violation

RETRY_STATUSES = {502, 503, 504}
CONN = "conn"  # what a transport error (reset, refused, timeout) is recorded as
NUL_PROMPT = "run: printf 'a\\000b'"
BIG_PROMPT = "run: head -c 1500000 /dev/zero | tr '\\0' x"
BIG_BYTES = 1_500_000
SLEEP_PROMPT = "sleep: 3"
RUN_WAIT_SECONDS = 75.0
TASK_WAIT_SECONDS = 120.0
SOAK_LEASE_MS = 15_000

# Invariants the flows check on the answers they get (the tables are checked at the end).
NO_500 = "no 500"
IDEMPOTENT = "idempotent creates agree under races"
FENCED = "a stale holder writes nothing"
REPLAY = "a repeated batchKey replays"
OUTPUT = "a completed turn's output is in the log"
TEXT = "NUL and lone surrogates stored as U+FFFD"
LIMITS = "oversize input refused with 413"
FOLLOW = "a follower sees every event once, in order"
IDLE = "a run with nothing left to do ends"
IDLE_SECONDS = 15.0  # the runners idle 0.5 s; this is the slack a claimed run gets to end


@dataclass(frozen=True)
class Answer:
    status: int | str  # an HTTP status, or CONN
    body: object

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300


@dataclass
class Recorder:
    """What every thread saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    finals: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    transient: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[tuple[float, str, int, str]] = field(default_factory=list)  # (t, request, status, body)
    acknowledged: Acknowledged = field(default_factory=Acknowledged)
    violations: list[Violation] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    fault_notes: list[str] = field(default_factory=list)
    windows: list[tuple[str, float, float]] = field(default_factory=list)  # (fault kind, start, end)
    killed_runs: set[str] = field(default_factory=set)

    def attempt(self, kind: str, status, request: str, body: str) -> None:
        with self.lock:
            self.transient[kind][status] += 1
            if isinstance(status, int) and status >= 500:
                self.server_errors.append((time.monotonic(), request, status, body[:300]))

    def final(self, kind: str, status) -> None:
        with self.lock:
            self.finals[kind][status] += 1

    def violation(self, invariant: str, detail: str) -> None:
        with self.lock:
            self.violations.append(Violation(invariant, " ".join(detail.split())))

    def note(self, text: str) -> None:
        with self.lock:
            self.fault_notes.append(text)

    def fault(self, kind: str, note: str | None = None) -> None:
        with self.lock:
            self.faults[kind] += 1
            if note:
                self.fault_notes.append(f"{kind}: {note}")

    def acked_events(self, run_id: str, runner_id: str, epoch: int, items: list[dict]) -> None:
        with self.lock:
            self.acknowledged.events += [
                AckedEvent(run_id, item["id"], int(item["seq"]), item["type"], runner_id, epoch) for item in items
            ]

    def acked_record(self, kind: str, record_id: str) -> None:
        with self.lock:
            self.acknowledged.records.append((kind, record_id))

    def acked_claim(self, run_id: str, runner_id: str, epoch: int) -> None:
        with self.lock:
            self.acknowledged.claims.append(Claim(run_id, runner_id, epoch))


class Api:
    """One key's calls, over one keep-alive client. Transport errors and 502/503/504 are retried
    (every write the soak sends carries an idempotency key or batch key, or is safe to repeat)
    until `retry_seconds` pass; every attempt is recorded, and the final answer per kind."""

    def __init__(self, base_url: str, key: str, recorder: Recorder, *, retry_seconds: float = 45.0):
        self.http = httpx.Client(
            base_url=f"{base_url}/api/v1",
            timeout=httpx.Timeout(45.0, connect=5.0),
            headers={"Authorization": f"Bearer {key}"},
        )
        self.recorder = recorder
        self.retry_seconds = retry_seconds

    def close(self) -> None:
        self.http.close()

    def call(self, kind: str, method: str, path: str, *, body=None, params=None) -> Answer:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        while True:
            try:
                response = self.http.request(method, path, content=content, params=params, headers=headers)
            except httpx.TransportError as error:
                answer, text = Answer(CONN, None), f"{type(error).__name__}: {error}"
            else:
                try:
                    parsed = response.json()
                except ValueError:
                    parsed = None
                answer, text = Answer(response.status_code, parsed), response.text
            self.recorder.attempt(kind, answer.status, f"{method} {path}", text)
            transient = answer.status == CONN or answer.status in RETRY_STATUSES
            if not (transient and time.monotonic() + delay < deadline):
                self.recorder.final(kind, answer.status)
                return answer
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 3.0)


def error_kind(answer: Answer) -> str | None:
    if isinstance(answer.body, dict) and isinstance(answer.body.get("error"), dict):
        return answer.body["error"].get("kind")
    return None


@dataclass
class Context:
    base_url: str
    client_key: str
    runner_key: str
    recorder: Recorder
    stop: threading.Event  # set when waits must give up (the drain is over)
    rng: random.Random
    sessions: list[str]

    def __post_init__(self):
        self.client = Api(self.base_url, self.client_key, self.recorder)
        self.runner = Api(self.base_url, self.runner_key, self.recorder)

    def close(self) -> None:
        self.client.close()
        self.runner.close()

    def sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)


# --- helpers --------------------------------------------------------------------------------


def create_run(ctx: Context, *, session: str | None, kind: str = "create-run", **fields) -> dict | None:
    body = {"backendProfile": "echo", "idempotencyKey": f"soak-{uuid.uuid4().hex}", **fields}
    if session:
        body["sessionRef"] = {"sessionId": session}
    answer = ctx.client.call(kind, "POST", "/runs", body=body)
    if not answer.ok:
        return None
    ctx.recorder.acked_record("run", answer.body["id"])
    return answer.body


def send_command(ctx: Context, run_id: str, command_type: str, payload: dict, *, kind: str = "create-command"):
    answer = ctx.client.call(
        kind,
        "POST",
        f"/runs/{run_id}/commands",
        body={"type": command_type, "payload": payload, "idempotencyKey": f"soak-{uuid.uuid4().hex}"},
    )
    if not answer.ok:
        return None
    ctx.recorder.acked_record("command", answer.body["id"])
    return answer.body


def follow_to_end(ctx: Context, run_id: str, *, seconds: float = RUN_WAIT_SECONDS) -> list[dict] | None:
    """The run's events until its terminal_status, by long-poll; None if it did not end in time."""
    deadline = time.monotonic() + seconds
    events: list[dict] = []
    after = 0
    while time.monotonic() < deadline and not ctx.stop.is_set():
        answer = ctx.client.call(
            "follow-events", "GET", f"/runs/{run_id}/events", params={"afterSeq": after, "wait": 10, "limit": 500}
        )
        if not answer.ok:
            ctx.sleep(0.5)
            continue
        for event in answer.body["items"]:
            if event["seq"] != len(events) + 1:
                ctx.recorder.violation(
                    FOLLOW,
                    f"run {run_id}: after seq {len(events)} the long-poll gave seq {event['seq']} (afterSeq {after})",
                )
                return None
            events.append(event)
        after = int(answer.body["cursor"])
        if any(event["type"] == "terminal_status" for event in answer.body["items"]):
            return events
    return None


def end_run(ctx: Context, run_id: str, events: list[dict] | None) -> None:
    """A flow leaves nothing running: a run it gave up waiting for is cancelled."""
    if events is None:
        ctx.recorder.final("run-not-ended-in-time", "timeout")
        ctx.client.call("cancel-run", "POST", f"/runs/{run_id}/cancel", body={"reason": "soak gave up waiting"})


def abandon(ctx: Context, run_id: str) -> None:
    """A flow that cannot go on (a call failed, someone else took the run) cancels its run."""
    ctx.client.call("cancel-run", "POST", f"/runs/{run_id}/cancel", body={"reason": "soak abandons the run"})


def wait_acknowledged(ctx: Context, command_id: str, *, seconds: float = 45.0) -> bool:
    """Until the runner took the command (its turn is under way); False if it ended first or
    the time ran out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.stop.is_set():
        answer = ctx.client.call("get-command", "GET", f"/commands/{command_id}")
        if answer.ok and answer.body["state"] != "pending":
            return answer.body["state"] == "acknowledged"
        ctx.sleep(0.3)
    return False


def command_states(ctx: Context, run_id: str) -> dict[str, dict]:
    answer = ctx.client.call("list-commands", "GET", f"/runs/{run_id}/commands", params={"limit": 100})
    return {item["id"]: item for item in answer.body["items"]} if answer.ok else {}


def read_inbox(ctx: Context, session: str | None) -> None:
    ctx.client.call("list-sessions", "GET", "/sessions", params={"readerId": "soak-reader", "limit": 20})
    if session:
        ctx.client.call(
            "mark-read", "POST", f"/sessions/{quote(session, safe='')}/read", body={"readerId": "soak-reader"}
        )


def check_turn_output(ctx: Context, run_id: str, prompt: str, command: dict, events: list[dict]) -> None:
    """A turn the runner reported completed left its output in the log: the command's output
    for `run:` lines (NULs stored as U+FFFD, a megabyte shortened, never dropped)."""
    if command.get("state") != "completed" or run_id in ctx.recorder.killed_runs:
        return
    outputs = [event for event in events if event["type"] == "command_output"]
    if prompt == NUL_PROMPT:
        texts = [event["payload"].get("output") for event in outputs]
        if not texts:
            ctx.recorder.violation(OUTPUT, f"run {run_id}: NUL turn completed without its command_output")
        elif "a\ufffdb" not in texts:
            ctx.recorder.violation(TEXT, f"run {run_id}: NUL output stored as {texts[0]!r}")
    elif prompt == BIG_PROMPT:
        if not outputs:
            ctx.recorder.violation(OUTPUT, f"run {run_id}: megabyte turn completed without its command_output")
        else:
            payload = outputs[0]["payload"]
            kept = len(payload.get("output") or "")
            if kept + int(payload.get("truncatedBytes") or 0) < BIG_BYTES // 2:
                ctx.recorder.violation(
                    OUTPUT,
                    f"run {run_id}: megabyte output kept {kept} chars, truncatedBytes {payload.get('truncatedBytes')}",
                )


def check_steer_answered(ctx: Context, run_id: str, steer_id: str, turn_id: str, events: list[dict]) -> None:
    """A steer delivered (completed) a second or more before its turn ended was answered by the
    agent (`steered: ...`) in the log. One delivered as the agent was exiting may go unanswered."""
    ended = {
        event["payload"].get("commandId"): datetime.fromisoformat(event["createdAt"].replace("Z", "+00:00"))
        for event in events
        if (event["payload"] or {}).get("phase") == "command-terminal"
    }
    steer_end, turn_end = ended.get(steer_id), ended.get(turn_id)
    states = {
        event["payload"].get("commandId"): event["payload"].get("state")
        for event in events
        if (event["payload"] or {}).get("phase") == "command-terminal"
    }
    if steer_end is None or turn_end is None or states.get(steer_id) != "completed":
        return
    if run_id in ctx.recorder.killed_runs:
        return
    if (turn_end - steer_end).total_seconds() < 1.0:
        return
    answers = [event["payload"].get("text") or "" for event in events if event["type"] == "assistant_message"]
    if not any(text.startswith("steered: soak steer") for text in answers):
        ctx.recorder.violation(
            OUTPUT,
            f"run {run_id}: steer completed {(turn_end - steer_end).total_seconds():.1f} s "
            f"before its turn ended, no 'steered:' answer in the log",
        )


# --- flows ----------------------------------------------------------------------------------


def flow_turn(ctx: Context, prompt: str, *, steer: bool = False, cancel: str | None = None, turns: int = 1) -> None:
    """A run in a session with `turns` turns of `prompt`; mid-turn, maybe a steer, or a cancel of
    the run or of the turn. The flow follows the run to its end and checks the outputs."""
    session = ctx.rng.choice(ctx.sessions)
    run = create_run(ctx, session=session)
    if run is None:
        return
    commands = [send_command(ctx, run["id"], "turn", {"prompt": prompt}) for _ in range(turns)]
    if not any(commands):
        abandon(ctx, run["id"])  # else its runner waits for a first command for minutes
        return
    if (steer or cancel) and commands[0] and wait_acknowledged(ctx, commands[0]["id"]):
        ctx.sleep(0.5 + ctx.rng.random())  # mid-turn: the agent sleeps 3 s
    steered = (
        send_command(ctx, run["id"], "steer", {"text": "soak steer \x00 with a NUL"}, kind="create-steer")
        if steer
        else None
    )
    if cancel == "run":
        ctx.client.call("cancel-run", "POST", f"/runs/{run['id']}/cancel", body={"reason": "soak cancel"})
    elif cancel == "command" and commands[0]:
        ctx.client.call(
            "cancel-command", "POST", f"/commands/{commands[0]['id']}/cancel", body={"reason": "soak cancel"}
        )
    events = follow_to_end(ctx, run["id"])
    end_run(ctx, run["id"], events)
    if events is not None:
        states = command_states(ctx, run["id"])
        for command in commands:
            if command:
                check_turn_output(ctx, run["id"], prompt, states.get(command["id"], {}), events)
        if steered and commands[0]:
            check_steer_answered(ctx, run["id"], steered["id"], commands[0]["id"], events)
    if ctx.rng.random() < 0.3:
        read_inbox(ctx, session)


def flow_cancel_before_claim(ctx: Context) -> None:
    """A turn cancelled before any runner claimed its run: the runner that claims it then has
    nothing to do, and must finish the run after its idle time, not hold it for minutes."""
    run = create_run(ctx, session=ctx.rng.choice(ctx.sessions))
    if run is None:
        return
    command = send_command(ctx, run["id"], "turn", {"prompt": SLEEP_PROMPT})
    if command is None:
        abandon(ctx, run["id"])
        return
    ctx.client.call("cancel-command", "POST", f"/commands/{command['id']}/cancel", body={"reason": "soak: early"})
    deadline = time.monotonic() + 60
    claimed_at = None
    while time.monotonic() < deadline and not ctx.stop.is_set():
        answer = ctx.client.call("get-run", "GET", f"/runs/{run['id']}")
        if answer.ok and answer.body["status"] not in ("pending", "claimed"):
            return
        if answer.ok and answer.body["status"] == "claimed" and claimed_at is None:
            claimed_at = time.monotonic()
        if claimed_at is not None and time.monotonic() - claimed_at > IDLE_SECONDS:
            ctx.recorder.violation(
                IDLE,
                f"run {run['id']}: its only turn was cancelled before the claim; "
                f"{IDLE_SECONDS:.0f} s after the claim {answer.body.get('claimedBy')} "
                f"still holds it",
            )
            break
        ctx.sleep(0.5)
    abandon(ctx, run["id"])


QUEUE_PROMPTS = [NUL_PROMPT, SLEEP_PROMPT, "sleep: 1\nrun: echo queued", "fail", "edit: notes.txt", BIG_PROMPT]


def flow_queue(ctx: Context, *, cancel: bool | str = False) -> None:
    """A queue task (three attempts, no backoff) followed to its end, perhaps cancelled mid-turn."""
    body = {
        "queue": "soak",
        "lane": ctx.rng.choice(["a", "b"]),
        "priority": ctx.rng.randint(0, 5),
        "title": "soak task \x00 with a NUL",
        "backendProfile": "echo",
        "payload": {"prompt": SLEEP_PROMPT if cancel else ctx.rng.choice(QUEUE_PROMPTS)},
        "executionPolicy": {"maxAttempts": 3, "backoffSeconds": 0},
        "idempotencyKey": f"soak-{uuid.uuid4().hex}",
    }
    if ctx.rng.random() < 0.5:
        body["sessionRef"] = {"sessionId": ctx.rng.choice(ctx.sessions)}
    answer = ctx.client.call("create-queue-task", "POST", "/queue-tasks", body=body)
    if not answer.ok:
        return
    task_id = answer.body["id"]
    ctx.recorder.acked_record("task", task_id)
    deadline = time.monotonic() + TASK_WAIT_SECONDS
    cancelled = False
    while time.monotonic() < deadline and not ctx.stop.is_set():
        ctx.sleep(0.05 if cancel == "at-once" and not cancelled else 1.0)
        answer = ctx.client.call("get-queue-task", "GET", f"/queue-tasks/{task_id}")
        if not answer.ok:
            continue
        if answer.body["state"] not in ("pending", "running"):
            return
        attempt = answer.body.get("latestAttempt") or {}
        if cancel == "at-once" and not cancelled:
            ctx.client.call("cancel-queue-task", "POST", f"/queue-tasks/{task_id}/cancel", body={"reason": "soak"})
            cancelled = True
        if cancel is True and not cancelled and attempt.get("commandId"):
            if wait_acknowledged(ctx, attempt["commandId"]):
                ctx.sleep(0.5 + ctx.rng.random())
            ctx.client.call("cancel-queue-task", "POST", f"/queue-tasks/{task_id}/cancel", body={"reason": "soak"})
            cancelled = True
    ctx.recorder.final("task-not-ended-in-time", "timeout")
    ctx.client.call("cancel-queue-task", "POST", f"/queue-tasks/{task_id}/cancel", body={"reason": "soak gave up"})


@dataclass(frozen=True)
class Call:
    kind: str
    method: str
    path: str
    body: dict | None = None
    runner: bool = False  # with the runner key, else the client key


def concurrently(ctx: Context, calls: list[Call]) -> list[Answer]:
    """The calls sent at once, one thread and one connection each (a barrier lines them up)."""
    answers: list[Answer | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def send(index: int) -> None:
        call = calls[index]
        api = Api(ctx.base_url, ctx.runner_key if call.runner else ctx.client_key, ctx.recorder)
        try:
            barrier.wait(timeout=10)
            answers[index] = api.call(call.kind, call.method, call.path, body=call.body)
        except threading.BrokenBarrierError:
            answers[index] = Answer(CONN, None)
        finally:
            api.close()

    threads = [threading.Thread(target=send, args=(index,), daemon=True) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return [answer or Answer(CONN, None) for answer in answers]


def _race(ctx: Context, kind: str, path: str, bodies: list[dict]) -> list[Answer]:
    """The bodies POSTed at once, as a client retrying one create concurrently."""
    return concurrently(ctx, [Call(kind, "POST", path, body) for body in bodies])


def _judge_race(ctx: Context, what: str, bodies: list[dict], answers: list[Answer]) -> str | None:
    """One record for every 2xx (at most one 201); a body that differs from the winner's gets
    409. The winner's id, or None."""
    variants = [json.dumps(body, sort_keys=True) for body in bodies]
    ok = [(variant, answer) for variant, answer in zip(variants, answers, strict=True) if answer.ok]
    ids = {answer.body["id"] for _, answer in ok}
    created = sum(answer.status == 201 for _, answer in ok)
    winners = {variant for variant, _ in ok}
    statuses = [answer.status for answer in answers]
    if len(ids) > 1 or created > 1 or len(winners) > 1:
        ctx.recorder.violation(IDEMPOTENT, f"{what}: statuses {statuses}, ids {sorted(ids)}")
    for variant, answer in zip(variants, answers, strict=True):
        if winners and variant not in winners and answer.status != 409 and answer.status != CONN:
            ctx.recorder.violation(IDEMPOTENT, f"{what}: another body under the same key got {answer.status}")
    return next(iter(ids), None)


def flow_race(ctx: Context) -> None:
    """A client repeating one create concurrently: a run (in a new session), a turn, a queue
    task; one body in four differs, so it (or the others) must get 409."""
    session = f"soak-race/{uuid.uuid4().hex[:10]}#1"
    key = f"soak-race-{uuid.uuid4().hex}"
    same = {
        "backendProfile": "echo",
        "sessionRef": {"sessionId": session},
        "idempotencyKey": key,
        "metadata": {"variant": "a"},
    }
    bodies = [same, same, same, {**same, "metadata": {"variant": "b"}}]
    run_id = _judge_race(ctx, "POST /runs", bodies, _race(ctx, "race-create-run", "/runs", bodies))
    if run_id is None:
        return
    ctx.recorder.acked_record("run", run_id)
    command = {"type": "turn", "payload": {"prompt": "raced turn"}, "idempotencyKey": f"soak-{uuid.uuid4().hex}"}
    bodies = [command, command, command, {**command, "payload": {"prompt": "another raced turn"}}]
    command_id = _judge_race(
        ctx, "POST /runs/{id}/commands", bodies, _race(ctx, "race-create-command", f"/runs/{run_id}/commands", bodies)
    )
    if command_id:
        ctx.recorder.acked_record("command", command_id)
    else:
        abandon(ctx, run_id)
        return
    task = {
        "queue": "soak-race",
        "backendProfile": "echo",
        "payload": {"prompt": "raced task"},
        "idempotencyKey": f"soak-{uuid.uuid4().hex}",
    }
    bodies = [task, task, task, {**task, "priority": 3}]
    task_id = _judge_race(ctx, "POST /queue-tasks", bodies, _race(ctx, "race-create-task", "/queue-tasks", bodies))
    if task_id:
        ctx.recorder.acked_record("task", task_id)
    events = follow_to_end(ctx, run_id)
    end_run(ctx, run_id, events)


def _event_batch(ctx: Context, size: int) -> list[dict]:
    texts = [
        "plain line",
        "a NUL \x00 inside",
        "a lone surrogate \ud800 here",
        "x" * 20_000,
        "export GITHUB_TOKEN=ghp_" + "a" * 36,
        "émoji ✓ 🎉",
    ]
    kinds = ["assistant_message", "command_output", "reasoning", "tool_call"]
    return [
        {"type": ctx.rng.choice(kinds), "payload": {"text": ctx.rng.choice(texts), "n": index}} for index in range(size)
    ]


class SoakRunner:
    """The soak as a runner on one run: claims under its own runnerId and appends with batch
    keys, recording every event and claim a 2xx acknowledged."""

    def __init__(self, ctx: Context, run_id: str, label: str):
        self.ctx, self.run_id = ctx, run_id
        self.runner_id = f"soak-{label}-{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self.batches = 0

    def claim(self, lease_ms: int = SOAK_LEASE_MS) -> Answer:
        answer = self.ctx.runner.call(
            "claim", "POST", f"/runs/{self.run_id}/claim", body={"runnerId": self.runner_id, "leaseMs": lease_ms}
        )
        if answer.ok:
            self.epoch = answer.body["leaseEpoch"]
            self.ctx.recorder.acked_claim(self.run_id, self.runner_id, self.epoch)
        return answer

    def append(self, events: list[dict], *, kind: str = "append-batch", replay: bool = False) -> Answer:
        body = {
            "runnerId": self.runner_id,
            "leaseEpoch": self.epoch,
            "batchKey": f"{self.runner_id}:{self.epoch}:{self.batches}",
            "events": events,
        }
        self.batches += 1
        answer = self.ctx.runner.call(kind, "POST", f"/runs/{self.run_id}/events", body=body)
        if answer.ok:
            self.ctx.recorder.acked_events(self.run_id, self.runner_id, self.epoch, answer.body["items"])
        if answer.ok and replay:
            again = self.ctx.runner.call("append-replay", "POST", f"/runs/{self.run_id}/events", body=body)
            if again.ok:
                first = [(item["id"], item["seq"]) for item in answer.body["items"]]
                second = [(item["id"], item["seq"]) for item in again.body["items"]]
                if again.status != 200 or first != second:
                    self.ctx.recorder.violation(
                        REPLAY,
                        f"run {self.run_id} batch {body['batchKey']}: replay "
                        f"{again.status}, {len(second)} items, same: {first == second}",
                    )
                self.ctx.recorder.acked_events(self.run_id, self.runner_id, self.epoch, again.body["items"])
        return answer

    def lease_body(self, **extra) -> dict:
        return {"runnerId": self.runner_id, "leaseEpoch": self.epoch, **extra}


def _check_text(ctx: Context, run_id: str, sent: list[dict], answer: Answer) -> None:
    for event, item in zip(sent, answer.body["items"], strict=False):
        text = event["payload"]["text"]
        stored = item["payload"].get("text")
        if ("\x00" in text or "\ud800" in text) and ("\x00" in (stored or "") or "\ufffd" not in (stored or "")):
            ctx.recorder.violation(TEXT, f"run {run_id} seq {item['seq']}: sent {text[:40]!r}, got {stored!r:.60}")
            return


def flow_soak_runner(ctx: Context) -> None:
    """The soak claims a run itself, takes its turn and appends batches (some repeated, one
    oversize), then finishes the turn and the run."""
    session = ctx.rng.choice(ctx.sessions) if ctx.rng.random() < 0.5 else None
    run = create_run(ctx, session=session)
    if run is None:
        return
    runner = SoakRunner(ctx, run["id"], "r")
    claimed = runner.claim()
    command = send_command(ctx, run["id"], "turn", {"prompt": "a turn the soak answers itself"})
    if not claimed.ok:
        # The worker's runner was first: it answers the turn.
        if command:
            end_run(ctx, run["id"], follow_to_end(ctx, run["id"]))
        else:
            abandon(ctx, run["id"])
        return
    if command:
        ctx.runner.call("ack", "POST", f"/commands/{command['id']}/ack", body=runner.lease_body())
    for index in range(ctx.rng.randint(3, 8)):
        sent = _event_batch(ctx, ctx.rng.randint(1, 40))
        answer = runner.append(sent, replay=ctx.rng.random() < 0.3)
        if answer.ok:
            _check_text(ctx, run["id"], sent, answer)
        elif error_kind(answer) == "runner-lease-conflict":
            break
        if index == 1 and ctx.rng.random() < 0.3:
            _oversize(ctx, runner)
        if index % 3 == 2:
            ctx.runner.call(
                "heartbeat", "POST", f"/runs/{run['id']}/heartbeat", body=runner.lease_body(leaseMs=SOAK_LEASE_MS)
            )
    if command:
        ctx.runner.call(
            "finish-command",
            "POST",
            f"/commands/{command['id']}/finish",
            body=runner.lease_body(terminalStatus="completed"),
        )
    answer = ctx.runner.call(
        "finish-run", "POST", f"/runs/{run['id']}/finish", body=runner.lease_body(terminalStatus="completed")
    )
    if not answer.ok:
        abandon(ctx, run["id"])


def _oversize(ctx: Context, runner: SoakRunner) -> None:
    """One event over 256 KiB, and a body over 1 MiB: 413, in the envelope, nothing written."""
    for kind, events in (
        ("append-oversize-event", [{"type": "command_output", "payload": {"output": "y" * 300_000}}]),
        ("append-oversize-body", [{"type": "command_output", "payload": {"output": "z" * 200_000}} for _ in range(6)]),
    ):
        answer = runner.append(events, kind=kind)
        if answer.status != 413 or error_kind(answer) != "schema-invalid":
            ctx.recorder.violation(LIMITS, f"{kind} on run {runner.run_id}: {answer.status} {str(answer.body)[:120]}")


def flow_fence(ctx: Context) -> None:
    """Runner A's lease lapses and runner B takes the run over: A's append and heartbeat must be
    refused (409 runner-lease-conflict) and write nothing; B goes on and finishes."""
    run = create_run(ctx, session=None)
    if run is None:
        return
    first = SoakRunner(ctx, run["id"], "a")
    if not first.claim(lease_ms=1000).ok:
        abandon(ctx, run["id"])
        return
    first.append(_event_batch(ctx, 3))
    ctx.sleep(1.5)
    second = SoakRunner(ctx, run["id"], "b")
    took_over = second.claim(lease_ms=SOAK_LEASE_MS).ok
    if first.epoch == second.epoch or not took_over:
        abandon(ctx, run["id"])  # someone else (the worker's runner, the reaper) came between
        return
    stale = first.append(_event_batch(ctx, 2), kind="append-stale")
    beat = ctx.runner.call(
        "heartbeat-stale", "POST", f"/runs/{run['id']}/heartbeat", body=first.lease_body(leaseMs=SOAK_LEASE_MS)
    )
    for what, answer in (("append", stale), ("heartbeat", beat)):
        if answer.status != 409 or error_kind(answer) != "runner-lease-conflict":
            ctx.recorder.violation(
                FENCED,
                f"run {run['id']}: stale {what} at epoch {first.epoch} (current {second.epoch}) got {answer.status}",
            )
    second.append(_event_batch(ctx, 2))
    answer = ctx.runner.call(
        "finish-run", "POST", f"/runs/{run['id']}/finish", body=second.lease_body(terminalStatus="completed")
    )
    if not answer.ok:
        abandon(ctx, run["id"])


def flow_race_runner(ctx: Context) -> None:
    """Runner calls racing each other: three runners claim a new run at once (one may win), the
    winner sends one batch three times at once under one batchKey (one append, two replays of
    it), finishes its turn while the client cancels it, and finishes the run while the client
    cancels that. The tables must show one terminal of each."""
    run = create_run(ctx, session=ctx.rng.choice(ctx.sessions))
    if run is None:
        return
    command = send_command(ctx, run["id"], "turn", {"prompt": "a turn raced over"})
    runners = [SoakRunner(ctx, run["id"], "race") for _ in range(3)]
    claims = concurrently(
        ctx,
        [
            Call(
                "race-claim",
                "POST",
                f"/runs/{run['id']}/claim",
                {"runnerId": runner.runner_id, "leaseMs": SOAK_LEASE_MS},
                runner=True,
            )
            for runner in runners
        ],
    )
    won = [(runner, answer) for runner, answer in zip(runners, claims, strict=True) if answer.ok]
    for runner, answer in won:
        runner.epoch = answer.body["leaseEpoch"]
        ctx.recorder.acked_claim(run["id"], runner.runner_id, runner.epoch)
    if len(won) > 1:
        ctx.recorder.violation(
            FENCED, f"run {run['id']}: {len(won)} racing claims won (epochs {[runner.epoch for runner, _ in won]})"
        )
    if not command:
        abandon(ctx, run["id"])
        return
    if not won:
        end_run(ctx, run["id"], follow_to_end(ctx, run["id"], seconds=30))
        return
    holder = max((runner for runner, _ in won), key=lambda runner: runner.epoch)
    path = f"/runs/{run['id']}"
    ctx.runner.call("ack", "POST", f"/commands/{command['id']}/ack", body=holder.lease_body())
    body = {
        **holder.lease_body(),
        "batchKey": f"{holder.runner_id}:{holder.epoch}:raced",
        "events": _event_batch(ctx, ctx.rng.randint(1, 30)),
    }
    appends = concurrently(ctx, [Call("race-append", "POST", f"{path}/events", body, runner=True)] * 3)
    for answer in appends:
        if answer.ok:
            ctx.recorder.acked_events(run["id"], holder.runner_id, holder.epoch, answer.body["items"])
    seen = {tuple((item["id"], item["seq"]) for item in answer.body["items"]) for answer in appends if answer.ok}
    created = sum(answer.status == 201 for answer in appends)
    if len(seen) > 1 or created > 1:
        ctx.recorder.violation(
            REPLAY,
            f"run {run['id']}: racing appends of one batchKey: "
            f"{[answer.status for answer in appends]}, {len(seen)} different answers",
        )
    bodies = [
        {
            **holder.lease_body(),
            "batchKey": f"{holder.runner_id}:{holder.epoch}:parallel-{index}",
            "events": _event_batch(ctx, ctx.rng.randint(1, 20)),
        }
        for index in range(3)
    ]
    parallel = concurrently(
        ctx, [Call("parallel-append", "POST", f"{path}/events", body, runner=True) for body in bodies]
    )
    for answer in parallel:
        if answer.ok:
            ctx.recorder.acked_events(run["id"], holder.runner_id, holder.epoch, answer.body["items"])
    if run.get("sessionRef"):
        reader = f"soak-reader-{uuid.uuid4().hex[:6]}"
        session_path = f"/sessions/{quote(run['sessionRef']['sessionId'], safe='')}/read"
        concurrently(ctx, [Call("race-mark-read", "POST", session_path, {"readerId": reader})] * 3)
    concurrently(
        ctx,
        [
            Call(
                "race-finish-command",
                "POST",
                f"/commands/{command['id']}/finish",
                holder.lease_body(terminalStatus="completed"),
                runner=True,
            ),
            Call("race-cancel-command", "POST", f"/commands/{command['id']}/cancel", {"reason": "raced"}),
        ],
    )
    concurrently(
        ctx,
        [
            Call(
                "race-finish-run", "POST", f"{path}/finish", holder.lease_body(terminalStatus="completed"), runner=True
            ),
            Call("race-cancel-run", "POST", f"{path}/cancel", {"reason": "raced"}),
        ],
    )
    end_run(ctx, run["id"], follow_to_end(ctx, run["id"], seconds=20))


HOSTILE_IDS = ["nul\x00inside", "lone\udc80surrogate", "x" * 300]


def flow_hostile(ctx: Context) -> None:
    """Identifiers PostgreSQL cannot store (NUL, a lone surrogate) or too long: 400 naming the
    field, never a 500 and never a write."""
    bad = ctx.rng.choice(HOSTILE_IDS)
    run = create_run(ctx, session=None)
    checks = [
        Call("hostile-create-run", "POST", "/runs", {"backendProfile": "echo", "idempotencyKey": bad}),
        Call("hostile-create-run", "POST", "/runs", {"backendProfile": "echo", "sessionRef": {"sessionId": bad}}),
        Call("hostile-create-task", "POST", "/queue-tasks", {"queue": bad, "backendProfile": "echo"}),
        Call("hostile-mark-read", "POST", "/sessions/soak-0/read", {"readerId": bad}),
    ]
    if run is not None:
        checks += [
            Call("hostile-claim", "POST", f"/runs/{run['id']}/claim", {"runnerId": bad, "leaseMs": 1000}, runner=True),
            Call(
                "hostile-command",
                "POST",
                f"/runs/{run['id']}/commands",
                {"type": "turn", "payload": {"prompt": "hostile"}, "idempotencyKey": bad},
            ),
        ]
    for call in checks:
        answer = (ctx.runner if call.runner else ctx.client).call(call.kind, call.method, call.path, body=call.body)
        if answer.ok:
            ctx.recorder.violation(TEXT, f"{call.method} {call.path} with identifier {bad[:20]!r} got {answer.status}")
            if call.kind == "hostile-create-run":
                ctx.client.call("cancel-run", "POST", f"/runs/{answer.body['id']}/cancel", body={})
    if run is not None:
        if send_command(ctx, run["id"], "turn", {"prompt": "after the hostile calls"}):
            end_run(ctx, run["id"], follow_to_end(ctx, run["id"]))
        else:
            abandon(ctx, run["id"])
    flow_hostile_content(ctx)


def unstorable(value) -> bool:
    """Whether a NUL or a lone surrogate is anywhere in the value (keys included)."""
    if isinstance(value, str):
        return "\x00" in value or any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, dict):
        return any(unstorable(key) or unstorable(item) for key, item in value.items())
    if isinstance(value, list):
        return any(unstorable(item) for item in value)
    return False


HOSTILE_TEXT = ["nul \x00 in free text", "lone \udc80 surrogate", "\ud83d unpaired high", "\x00"]


def flow_hostile_content(ctx: Context) -> None:
    """NUL and lone surrogates in free content (metadata keys and values, prompts, reasons,
    titles): stored with U+FFFD, 2xx, never a 500 or a refusal."""
    text = ctx.rng.choice(HOSTILE_TEXT)
    session = f"soak-hostile-{uuid.uuid4().hex[:8]}"
    run = create_run(ctx, session=None, kind="hostile-content-run", metadata={text: text, "note": [text, {text: 1}]})
    sent = [("hostile-content-run", run)]
    if run is not None:
        sent.append(
            (
                "hostile-content-command",
                send_command(ctx, run["id"], "turn", {"prompt": f"echo {text}"}, kind="hostile-content-command"),
            )
        )
    answer = ctx.client.call(
        "hostile-content-session",
        "PUT",
        f"/sessions/{session}",
        body={
            "tenantId": "soak",
            "projectId": "soak",
            "backendProfile": "echo",
            "metadata": {"title": text, text: text},
        },
    )
    sent.append(("hostile-content-session", answer.body if answer.ok else None))
    answer = ctx.client.call(
        "hostile-content-task",
        "POST",
        "/queue-tasks",
        body={
            "queue": "soak",
            "backendProfile": "echo",
            "title": text,
            "payload": {"prompt": text, text: [text]},
            "metadata": {text: text},
            "idempotencyKey": f"soak-{uuid.uuid4().hex}",
        },
    )
    if answer.ok:
        ctx.recorder.acked_record("task", answer.body["id"])
    sent.append(("hostile-content-task", answer.body if answer.ok else None))
    for what, record in sent:
        if record is None:
            ctx.recorder.violation(TEXT, f"{what} with {text!r} was not stored (see the operations table)")
        elif unstorable(record):
            ctx.recorder.violation(TEXT, f"{what}: {text!r} came back unsanitized: {json.dumps(record)[:120]}")
    if run is not None:
        ctx.client.call("cancel-run", "POST", f"/runs/{run['id']}/cancel", body={"reason": f"hostile {text}"})


FLOWS = [
    ("turn-nul", 3, lambda ctx: flow_turn(ctx, NUL_PROMPT)),
    ("turn-megabyte", 1, lambda ctx: flow_turn(ctx, BIG_PROMPT)),
    ("turn-two", 1, lambda ctx: flow_turn(ctx, NUL_PROMPT, turns=2)),
    ("turn-steer", 2, lambda ctx: flow_turn(ctx, "sleep: 5", steer=True)),
    ("turn-cancel-run", 1, lambda ctx: flow_turn(ctx, SLEEP_PROMPT, cancel="run")),
    ("turn-cancel-command", 1, lambda ctx: flow_turn(ctx, SLEEP_PROMPT, cancel="command")),
    ("turn-cancel-before-claim", 1, flow_cancel_before_claim),
    ("queue", 3, lambda ctx: flow_queue(ctx)),
    ("queue-cancel", 1, lambda ctx: flow_queue(ctx, cancel=True)),
    ("queue-cancel-at-once", 1, lambda ctx: flow_queue(ctx, cancel="at-once")),
    ("race", 1, flow_race),
    ("soak-runner", 3, flow_soak_runner),
    ("fence", 1, flow_fence),
    ("race-runner", 1, flow_race_runner),
    ("hostile-ids", 1, flow_hostile),
]


def client_loop(ctx: Context, until: float, flows_done: Counter, lock: threading.Lock) -> None:
    """Flows, picked by weight, until `until` (monotonic); each flow is bounded by its waits."""
    names = [name for name, _, _ in FLOWS]
    weights = [weight for _, weight, _ in FLOWS]
    plays = {name: play for name, _, play in FLOWS}
    try:
        while time.monotonic() < until and not ctx.stop.is_set():
            name = ctx.rng.choices(names, weights)[0]
            try:
                plays[name](ctx)
            except Exception as error:  # noqa: BLE001 - a flow's own bug must not stop the soak
                ctx.recorder.final(f"flow-crashed:{name}", type(error).__name__)
                ctx.recorder.note(f"flow {name} crashed: {error!r}"[:300])
            with lock:
                flows_done[name] += 1
    finally:
        ctx.close()
