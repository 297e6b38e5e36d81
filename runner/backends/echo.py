"""The echo backend: our own deterministic agent (see echo_agent) behind the same process
handling as the real CLIs."""

from __future__ import annotations

import sys
from pathlib import Path

from runner.backends.base import AgentEvent, Backend, Outcome, Parser
from runner.records import JsonObject


class EchoParser(Parser):
    def __init__(self) -> None:
        self.thread_id: str | None = None
        self.outcome: Outcome | None = None

    def feed(self, record: JsonObject) -> list[AgentEvent]:
        kind = record.get("type")
        if kind == "thread":
            self.thread_id = record.get("id")
        elif kind == "message":
            return [("assistant_message", {"text": record.get("text", "")})]
        elif kind == "output":
            return [
                (
                    "command_output",
                    {
                        "command": record.get("command"),
                        "output": record.get("output", ""),
                        "exitCode": record.get("exitCode"),
                    },
                )
            ]
        elif kind == "diff":
            return [("diff", {"path": record.get("path"), "patch": record.get("patch", "")})]
        elif kind == "failed":
            self.outcome = ("failed", "agent-failed", record.get("message"))
            return [("error", {"severity": "fatal", "message": record.get("message")})]
        elif kind == "done":
            self.outcome = ("completed", None, None)
        return []


class EchoBackend(Backend):
    profile = "echo"
    can_steer = True

    def command(self, *, prompt: str, thread_id: str | None, workdir: str) -> tuple[list[str], dict[str, str], Parser]:
        argv = [sys.executable, str(Path(__file__).with_name("echo_agent.py")), prompt]
        if thread_id:
            argv += ["--thread", thread_id]
        return argv, {}, EchoParser()
