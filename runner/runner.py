"""The reference runner: claims one run, executes its commands through a backend, streams the
events back, and finishes the run.

- The lease is renewed in the background (every third of it). A 409 `runner-lease-conflict`
  from any call means another runner took the run over: the backend is killed and the runner
  stops without another write.
- The run's own event stream is the control channel, followed over one SSE stream
  (`view=control`, resumed by itself with `Last-Event-ID`; long-polls only where the server has
  no stream): `command-created` brings commands, `cancel-requested` / `terminal_status` end the
  run, a `command-terminal` that cancels the turn in progress stops it. The backend's process
  group is killed within the grace period. Idle, the runner sends nothing but its heartbeats;
  in a turn, nothing but its batches and heartbeats.
- Events go out in batches (runner.sink): every 100 ms or 50 events, split to the API's
  limits, each under a key that a retry reuses and no other batch has. Oversized payloads are
  shortened, refused events replaced by an `event-rejected` notice, and while the lease is held
  an outage is waited out: the runner's calls, and the lease renewal, retry until it ends.
- After its last turn the runner waits `idle_seconds` for another command, then finishes the
  run with the last turn's result.
- A run whose `workspaceRef` is a git one (runner.workspace) has it prepared before the first
  turn: checked out, or fetched on a session's later run; the agent works in it (in its `path`).
  A workspace that cannot be prepared fails the run (`infra-failed`) before any turn. After each
  turn the workspace is reported against its base (a `diff` and a `workspace-summary`),
  committed and pushed first when the run asks; a report that fails never fails the turn.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx

from runner.backends import AgentProcess, Backend, TurnResult, backend_for
from runner.client import AgentRunClient, ApiError, Backoff, EventStream
from runner.records import Command, Event, Run
from runner.sink import SERVER_ERROR_ATTEMPTS, EventSink, LeaseLost
from runner.workspace import GitWorkspace, Workspace, WorkspaceError, branch_name

logger = logging.getLogger("agentrun.runner")
OPEN = ("pending", "acknowledged")

__all__ = ["EventSink", "LeaseLost", "Runner"]


@dataclass
class Turn:
    """A turn in progress: its agent process, waited for in a thread of its own."""

    command: Command
    process: AgentProcess
    result: TurnResult | None = None  # set before `done`
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._wait, name=f"turn-{self.command['seq']}", daemon=True)

    def _wait(self) -> None:
        try:
            self.result = self.process.wait()
        except Exception as exc:
            logger.exception("turn %s failed in the runner", self.command["id"])
            self.result = TurnResult("failed", "agent-failed", f"runner error: {exc}")
        finally:
            self.done.set()


class Runner:
    def __init__(
        self,
        client: AgentRunClient,
        run_id: str,
        *,
        runner_id: str | None = None,
        lease_ms: int = 60_000,
        workdir: str = ".",
        idle_seconds: float = 10.0,
        first_command_seconds: float = 600.0,
        grace_seconds: float = 5.0,
        backend: Backend | None = None,
        server_error_attempts: int = SERVER_ERROR_ATTEMPTS,
    ):
        self.client, self.run_id = client, run_id
        self.runner_id = runner_id or f"runner-{uuid.uuid4().hex[:12]}"
        self.lease_ms, self.workdir = lease_ms, workdir
        self.agent_workdir = workdir  # the workspace's `path` in it, once prepared
        self.workspace: Workspace | None = None
        self.idle_seconds, self.first_command_seconds, self.grace_seconds = (
            idle_seconds,
            first_command_seconds,
            grace_seconds,
        )
        self.backend = backend
        self.server_error_attempts = server_error_attempts
        self.epoch = 0
        self.stop = threading.Event()
        self.lost = threading.Event()
        self.ended = threading.Event()  # the run ended elsewhere (cancelled, reaped)
        self.turn: Turn | None = None
        self.queue: list[Command] = []
        self.thread_id: str | None = None
        self.last_result: TurnResult | None = None
        # Turns seen in any state: a run whose turns were all cancelled before they started has
        # had its turns, and ends after idle_seconds like any other.
        self.turns_seen = 0
        self.command_seq = 0
        self.known_commands: set[str] = set()
        # The control stream and what its follower thread hands the loop: events, then None
        # when the stream ended, or the error that ended it.
        self.control: EventStream | None = None
        self.inbox: queue.Queue[Event | BaseException | None] = queue.Queue()
        self.shut_down = False  # a signal asked the runner to stop; the run is left to its lease
        self.events: EventSink | None = None

    # --- state shared with the threads ------------------------------------------------------

    def holding(self) -> bool:
        """Whether the lease is still ours to use: not lost, and no signal asked us to leave."""
        return not self.lost.is_set() and not self.shut_down

    def lose_lease(self) -> None:
        if not self.lost.is_set():
            logger.warning("run %s: lease lost to another runner; stopping", self.run_id)
        self.lost.set()
        self.stop.set()
        if self.events is not None:
            self.events.interrupt()
        self._cancel_turn()

    def leave(self) -> None:
        """A signal asked the runner to stop: stop the agent (its own process group) and leave the
        run to its lease; another runner, or the reaper, takes it from there."""
        self.shut_down = True
        self.stop.set()
        if self.events is not None:
            self.events.interrupt()

    def _cancel_turn(self) -> None:
        turn = self.turn
        if turn is not None and not turn.done.is_set():
            turn.process.cancel(self.grace_seconds)

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        """0 when the run was finished here or ended elsewhere; 3 when the lease was lost; 143
        when a signal stopped the runner first."""
        run = self.client.claim(self.run_id, self.runner_id, self.lease_ms)
        self.epoch = run["leaseEpoch"]
        self.thread_id = (run.get("sessionRef") or {}).get("threadId")
        if self.backend is None:
            self.backend = backend_for(run["backendProfile"])
        logger.info(
            "run %s claimed by %s (epoch %d, backend %s)", self.run_id, self.runner_id, self.epoch, self.backend.profile
        )
        self.events = events = EventSink(
            self.client,
            run_id=self.run_id,
            runner_id=self.runner_id,
            lease_epoch=self.epoch,
            holding=self.holding,
            lease_lost=self.lose_lease,
            server_error_attempts=self.server_error_attempts,
        )
        retry_while, self.client.retry_while = self.client.retry_while, self.holding
        heartbeat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        heartbeat.start()
        try:
            if self._prepare_workspace(run):
                self._loop()
        except LeaseLost:
            self.lose_lease()
        except (ApiError, httpx.TransportError):
            if self.holding():
                raise
            # A call that gave up because the lease was lost meanwhile, or we are leaving.
        finally:
            self.stop.set()
            if self.control is not None:
                self.control.close()
            self._cancel_turn()
            if self.turn is not None:
                self.turn.thread.join(timeout=self.grace_seconds + 10)
            if not self.lost.is_set():
                with contextlib.suppress(LeaseLost):
                    events.close()  # a late flush is allowed with our epoch
            self.client.retry_while = retry_while
            heartbeat.join(timeout=2)
        if self.lost.is_set():
            return 3
        return 143 if self.shut_down else 0

    def _prepare_workspace(self, run: Run) -> bool:
        """Prepare the run's git workspace, if it has one, and say so (`workspace-ready`). False
        when it could not be: the run is then finished `infra-failed`, and no turn runs."""
        try:
            spec = GitWorkspace.from_ref(run.get("workspaceRef"))
            if spec is None:
                return True
            owner = (run.get("sessionRef") or {}).get("sessionId") or self.run_id
            branch = branch_name(str(owner))
            workspace = Workspace(spec, self.workdir, branch=branch, run_id=self.run_id, stop=self.stop)
            ready = workspace.prepare()
        except WorkspaceError as error:
            if self.stop.is_set():
                return False  # the run ended, the lease was lost or we are leaving: not ours to finish
            logger.error("run %s: the workspace could not be prepared: %s", self.run_id, error)
            self._finish_run(TurnResult("failed", "infra-failed", str(error)))
            return False
        self.workspace, self.agent_workdir = workspace, str(ready.cwd)
        self._claimed()[1].emit("backend_status", ready.payload)
        logger.info("run %s: workspace ready at %s", self.run_id, ready.payload["commit"])
        return True

    def _heartbeats(self) -> None:
        """Renew the lease every third of it, whatever else is going on: this thread shares no
        lock with the event sender, and a failed renewal is tried again soon (with backoff, never
        later than the next renewal is due) rather than waiting inside the failing call."""
        interval = max(self.lease_ms / 3000.0, 0.2)
        wait, backoff = interval, Backoff()
        while not self.stop.wait(wait):
            try:
                run = self.client.heartbeat(self.run_id, self.runner_id, self.epoch, self.lease_ms, retry=False)
            except ApiError as error:
                if error.lease_lost:
                    self.lose_lease()
                    return
                logger.warning("heartbeat failed: %s", error)
                wait = min(interval, backoff.next())
                continue
            except Exception:
                logger.warning("heartbeat failed", exc_info=True)
                wait = min(interval, backoff.next())
                continue
            wait, backoff = interval, Backoff()
            if run["status"] not in ("pending", "claimed"):
                self._ended_elsewhere()
                return

    def _ended_elsewhere(self) -> None:
        self.ended.set()
        self.stop.set()
        self._cancel_turn()

    def _loop(self) -> None:
        idle_since = time.monotonic()
        limit = self.first_command_seconds
        self.control = self.client.stream_events(self.run_id, view="control")
        threading.Thread(target=self._follow, args=(self.control,), name="control", daemon=True).start()
        self._take_commands()
        while not self.stop.is_set():
            self._settle_turn()
            if self.turn is None and self.queue:
                self._start(self.queue.pop(0))
            if self.turn is None and not self.queue:
                if self.last_result is not None or self.turns_seen:
                    limit = self.idle_seconds
                if time.monotonic() - idle_since >= limit:
                    self._finish_run()
                    return
            else:
                idle_since = time.monotonic()
            # Local waits only: the turn's end, the idle limit, or what the stream brings.
            wait = 0.2 if self.turn is not None else max(0.05, min(2.0, limit - (time.monotonic() - idle_since)))
            try:
                item = self.inbox.get(timeout=wait)
            except queue.Empty:
                continue
            while item is not None:
                if isinstance(item, BaseException):
                    raise item
                self._control(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            else:
                if not self.stop.is_set():  # the stream ended: after terminal_status, so has the run
                    self._ended_elsewhere()

    def _follow(self, control: EventStream) -> None:
        """The follower thread: the control stream's events, into the loop's inbox."""
        try:
            for event in control:
                self.inbox.put(event)
        except BaseException as error:  # noqa: BLE001 - handed to the loop, which raises it
            self.inbox.put(error)
        else:
            self.inbox.put(None)

    def _control(self, event: Event) -> None:
        payload = event.get("payload") or {}
        phase = payload.get("phase")
        if event["type"] == "terminal_status" or phase == "cancel-requested":
            self._ended_elsewhere()
        elif phase == "command-created" and payload.get("commandId") not in self.known_commands:
            self._take_commands()
        elif (
            phase == "command-terminal"
            and self.turn is not None
            and payload.get("commandId") == self.turn.command["id"]
        ) and payload.get("state") == "cancelled":
            self._cancel_turn()

    def _take_commands(self) -> None:
        page = self.client.commands(self.run_id, after_seq=self.command_seq)
        for command in page["items"]:
            self.command_seq = command["seq"]
            self.known_commands.add(command["id"])
            self.turns_seen += command["type"] == "turn"
            if command["state"] not in OPEN:
                continue
            if command["type"] == "turn":
                self.queue.append(command)
            elif command["type"] == "steer":
                self._steer(command)
            else:
                self._finish_command(
                    command, TurnResult("failed", "schema-invalid", f"unknown command type {command['type']}")
                )

    def _steer(self, command: Command) -> None:
        self._ack(command)
        turn = self.turn
        text = (command.get("payload") or {}).get("text") or (command.get("payload") or {}).get("prompt") or ""
        if turn is not None and not turn.done.is_set() and turn.process.steer(text):
            self._finish_command(command, TurnResult("completed"))
        else:
            self._finish_command(command, TurnResult("failed", "agent-failed", "no turn in progress to steer"))

    def _ack(self, command: Command) -> None:
        try:
            self.client.ack(command["id"], self.runner_id, self.epoch)
        except ApiError as error:
            if error.lease_lost:
                raise LeaseLost from None
            raise

    def _claimed(self) -> tuple[Backend, EventSink]:
        """The backend and the event sink, which run() sets up once the claim is made."""
        if self.backend is None or self.events is None:
            raise RuntimeError(f"run {self.run_id} is not claimed")
        return self.backend, self.events

    def _start(self, command: Command) -> None:
        self._ack(command)
        backend, events = self._claimed()
        prompt = (command.get("payload") or {}).get("prompt") or ""
        process = backend.start(prompt=prompt, thread_id=self.thread_id, workdir=self.agent_workdir, emit=events.emit)
        turn = Turn(command=command, process=process)
        self.turn = turn
        turn.thread.start()
        logger.info("turn %s started (pid %d)", command["id"], process.pid)

    def _settle_turn(self) -> None:
        turn = self.turn
        if turn is None or not turn.done.is_set():
            return
        self.turn = None
        result = turn.result
        if result is None:
            raise RuntimeError(f"turn {turn.command['id']} ended without a result")
        if result.thread_id:
            self.thread_id = result.thread_id
        if self.workspace is not None and self.holding():
            self._report_workspace(self.workspace, turn.command)
        if not self._claimed()[1].flush():
            return  # the lease is lost or we are leaving: the turn's end is not ours to record
        self._finish_command(turn.command, result)
        self.last_result = result

    def _report_workspace(self, workspace: Workspace, command: Command) -> None:
        """The turn's workspace report; a failure of its own is said, and the turn goes on."""
        events = self._claimed()[1]
        try:
            reported = workspace.report(message=f"agentrun: turn {command['seq']} of run {self.run_id}")
        except Exception as error:  # noqa: BLE001 - said below: a report that fails never fails the turn
            said = str(error) if isinstance(error, WorkspaceError) else f"{type(error).__name__}: {error}"
            message = workspace.redact(said)
            logger.warning("run %s: the workspace report failed: %s", self.run_id, message)
            events.emit(
                "backend_status", {"phase": "workspace-report-failed", "commandId": command["id"], "message": message}
            )
            return
        for event_type, payload in reported:
            events.emit(event_type, {**payload, "commandId": command["id"]})

    def _finish_command(self, command: Command, result: TurnResult) -> None:
        try:
            self.client.finish_command(
                command["id"],
                self.runner_id,
                self.epoch,
                terminalStatus=result.terminal_status,
                failureKind=result.failure_kind,
                failureMessage=result.message,
                threadId=result.thread_id,
            )
        except ApiError as error:
            if error.lease_lost:
                raise LeaseLost from None
            raise

    def _finish_run(self, result: TurnResult | None = None) -> None:
        """Finish the run with `result`, else the last turn's."""
        if not self._claimed()[1].flush():
            return
        if result is None and self.last_result is not None:
            result = self.last_result
        elif result is None and self.turns_seen:
            result = TurnResult("cancelled", "cancelled", "every turn was cancelled before it started")
        elif result is None:
            result = TurnResult("failed", "agent-failed", "no command arrived")
        try:
            self.client.finish_run(
                self.run_id,
                self.runner_id,
                self.epoch,
                terminalStatus=result.terminal_status,
                failureKind=result.failure_kind,
                failureMessage=result.message,
                threadId=self.thread_id,
            )
        except ApiError as error:
            if error.lease_lost:
                raise LeaseLost from None
            raise
        logger.info("run %s finished: %s", self.run_id, result.terminal_status)
