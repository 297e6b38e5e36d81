"""What every backend shares: a turn's result, and the agent child process (its own process
group, JSON lines on stdout, a tail of stderr, a cancel that kills the whole group).

An agent's output is read as UTF-8 with errors replaced (U+FFFD): a tool that prints bytes of
another encoding, or cuts a character in two, must not end the turn. NUL and any other text go
through as they are; the manager stores what PostgreSQL cannot hold as U+FFFD.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from runner.records import JsonObject

# The environment variable that marks every process a turn's agent starts, however detached.
AGENT_MARK = "AGENTRUN_AGENT_MARK"
Emit = Callable[[str, JsonObject], None]  # (event type, payload): one event for the run
AgentEvent = tuple[str, JsonObject]  # (event type, payload), as a parser maps an agent's line
Outcome = tuple[str, str | None, str | None]  # (terminal status, failure kind, message)
logger = logging.getLogger("agentrun.runner")


@dataclass
class TurnResult:
    terminal_status: str  # completed, failed, blocked, cancelled, timeout
    failure_kind: str | None = None
    message: str | None = None
    thread_id: str | None = None


class Parser:
    """Turns an agent's JSON lines into events; decides the turn's result at the end: cancelled
    when we cancelled it, else the outcome its lines gave (`outcome`: status, failure kind,
    message), else `no_outcome`."""

    thread_id: str | None = None
    outcome: Outcome | None = None

    def feed(self, record: JsonObject) -> list[AgentEvent]:
        raise NotImplementedError

    def finish(self, *, exit_code: int, cancelled: bool, stderr_tail: str) -> TurnResult:
        if cancelled:
            return TurnResult("cancelled", "cancelled", "the turn was cancelled", self.thread_id)
        if self.outcome is not None:
            status, kind, message = self.outcome
            return TurnResult(status, kind, message, self.thread_id)
        return self.no_outcome(exit_code=exit_code, stderr_tail=stderr_tail)

    def no_outcome(self, *, exit_code: int, stderr_tail: str) -> TurnResult:
        """The agent ended without saying how the turn went."""
        return TurnResult(
            "failed", "backend-unavailable", f"the agent exited {exit_code}: {stderr_tail}".strip(), self.thread_id
        )


class Backend:
    profile = ""
    can_steer = False

    def command(self, *, prompt: str, thread_id: str | None, workdir: str) -> tuple[list[str], dict[str, str], Parser]:
        """argv, extra environment and a fresh parser for one turn."""
        raise NotImplementedError

    def start(self, *, prompt: str, thread_id: str | None, workdir: str, emit: Emit) -> AgentProcess:
        argv, env, parser = self.command(prompt=prompt, thread_id=thread_id, workdir=workdir)
        return AgentProcess(argv, cwd=workdir, env=env, parser=parser, emit=emit, steerable=self.can_steer)


class AgentProcess:
    """One turn of an agent: a child process in a new session (so a cancel reaches every process
    it started), its stdout parsed line by line into events as they come."""

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        parser: Parser,
        emit: Emit,
        steerable: bool = False,
    ):
        self.parser, self.emit, self.steerable = parser, emit, steerable
        self.cancelled = threading.Event()
        self._stderr: deque[str] = deque(maxlen=20)
        self.mark = uuid.uuid4().hex  # in the environment of the agent and of all it starts
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env, AGENT_MARK: self.mark},
            stdin=subprocess.PIPE if steerable else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        self._stdout, self._stderr_pipe = _pipe(self.process.stdout), _pipe(self.process.stderr)
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stderr(self) -> None:
        for line in self._stderr_pipe:
            self._stderr.append(line.rstrip("\n"))

    def wait(self) -> TurnResult:
        """Read the agent's lines to the end, emitting events; then the turn's result."""
        for raw in self._stdout:
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a JSON line: agents may print other things
            if not isinstance(record, dict):
                continue
            try:
                events = self.parser.feed(record)
            except Exception:
                logger.warning("skipped an agent line the parser could not read: %.200s", line, exc_info=True)
                continue
            for event_type, payload in events:
                self.emit(event_type, payload)
        exit_code = self.process.wait()
        self._stderr_thread.join(timeout=5)
        return self.parser.finish(
            exit_code=exit_code, cancelled=self.cancelled.is_set(), stderr_tail="\n".join(self._stderr)[-2000:]
        )

    def steer(self, text: str) -> bool:
        stdin = self.process.stdin  # a pipe when steerable
        if not self.steerable or stdin is None or self.process.poll() is not None:
            return False
        try:
            stdin.write(json.dumps({"type": "steer", "text": text}) + "\n")
            stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def cancel(self, grace_seconds: float = 5.0) -> None:
        """SIGINT to the agent's process group (the CLIs then write their cancel result); after
        the grace period, SIGKILL to whatever is left."""
        self.cancelled.set()
        # An agent may start its tools in sessions of their own, orphaned on purpose (codex's
        # sandbox forks twice and calls setsid), out of reach of its process group: they are
        # found by the mark they inherited, and by parentage while the agent still lives.
        descendants = _descendants(self.process.pid, self.mark)
        try:
            for signum, wait in ((signal.SIGINT, grace_seconds), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, signum)
                except ProcessLookupError:
                    return
                try:
                    self.process.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    descendants |= _descendants(self.process.pid, self.mark)
                    continue
                with contextlib.suppress(ProcessLookupError):  # the leader is gone; its children may not be
                    os.killpg(self.process.pid, signal.SIGKILL)
                return
        finally:
            # Again after the agent is gone: a tool may have started a process since the first
            # look. The mark still finds what parentage no longer can.
            for _ in range(3):
                descendants |= _descendants(self.process.pid, self.mark)
                if not descendants:
                    break
                for pid in descendants:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                descendants = set()


def _descendants(root: int, mark: str) -> set[int]:
    """Every live process below `root`, or carrying `mark` in its environment, read from /proc
    (empty without /proc)."""
    marked = f"{AGENT_MARK}={mark}".encode()
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == root:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                children.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(pid)
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if marked in environ.read().split(b"\0"):
                    found.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    todo = [root, *found]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _pipe(stream: IO[str] | None) -> IO[str]:
    """A pipe Popen was asked to open (so it is there)."""
    if stream is None:
        raise RuntimeError("the agent's output pipe was not opened")
    return stream
