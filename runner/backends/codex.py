"""The Codex backend: `codex exec --json`, its JSON lines mapped to agentrun events
(FORMATS.md §1 and §3.1). One exec run is one turn; the next turn resumes the thread."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

from runner.backends.base import AgentEvent, Backend, Outcome, Parser, TurnResult
from runner.records import JsonObject

UNAVAILABLE = re.compile(r"unexpected status (401|403|429|5\d\d)|connection|timed out|error sending request", re.I)


def failure_kind_for(message: str) -> str:
    """FORMATS §3.1 policy: the service or its credentials failed, or the agent did."""
    return "backend-unavailable" if UNAVAILABLE.search(message or "") else "agent-failed"


def git_diff(workdir: str, paths: list[str]) -> str | None:
    """Codex reports which files changed, not how: the patch comes from git, when it can."""
    try:
        done = subprocess.run(
            ["git", "diff", "--no-color", "--", *paths], cwd=workdir, capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and done.stdout else None


class CodexParser(Parser):
    def __init__(self, workdir: str | None = None) -> None:
        self.workdir = workdir
        self.thread_id: str | None = None
        self.outcome: Outcome | None = None
        self.lines = 0
        self.declined = False

    def feed(self, record: JsonObject) -> list[AgentEvent]:
        self.lines += 1
        kind = record.get("type")
        item = record.get("item")
        if not isinstance(item, dict):
            item = {}
        item_type = item.get("type")
        if kind == "thread.started":
            self.thread_id = record.get("thread_id") or self.thread_id
        elif kind == "item.started":
            return self._started(item_type, item)
        elif kind == "item.updated" and item_type == "todo_list":
            return [("tool_call", {"tool": "todo_list", "callId": item.get("id"), "items": item.get("items", [])})]
        elif kind == "item.completed":
            return self._completed(item_type, item)
        elif kind == "turn.completed":
            self.outcome = ("completed", None, None)
            return [("usage", self._usage(record.get("usage") or {}))]
        elif kind == "turn.failed":
            message = (record.get("error") or {}).get("message") or "the turn failed"
            status = "blocked" if self.declined else "failed"
            self.outcome = (status, failure_kind_for(message), message)
        elif kind == "error":
            return [("error", {"severity": "fatal", "message": record.get("message")})]
        return []

    def _started(self, item_type: object, item: JsonObject) -> list[AgentEvent]:
        if item_type == "command_execution":
            return [
                (
                    "tool_call",
                    {
                        "tool": "shell",
                        "command": item.get("command"),
                        "callId": item.get("id"),
                        "status": "in_progress",
                    },
                )
            ]
        if item_type == "mcp_tool_call":
            return [
                (
                    "tool_call",
                    {
                        "tool": f"{item.get('server')}/{item.get('tool')}",
                        "callId": item.get("id"),
                        "arguments": item.get("arguments"),
                        "status": "in_progress",
                    },
                )
            ]
        if item_type == "web_search":
            return [
                (
                    "tool_call",
                    {
                        "tool": "web_search",
                        "callId": item.get("id"),
                        "query": item.get("query"),
                        "action": item.get("action"),
                        "status": "in_progress",
                    },
                )
            ]
        if item_type == "todo_list":
            return [("tool_call", {"tool": "todo_list", "callId": item.get("id"), "items": item.get("items", [])})]
        return []

    def _completed(self, item_type: object, item: JsonObject) -> list[AgentEvent]:
        if item_type == "agent_message":
            return [("assistant_message", {"text": item.get("text", "")})]
        if item_type == "reasoning":
            return [("reasoning", {"text": item.get("text", "")})]
        if item_type == "command_execution":
            if item.get("status") == "declined":
                self.declined = True
            return [
                (
                    "command_output",
                    {
                        "command": item.get("command"),
                        "output": item.get("aggregated_output", ""),
                        "exitCode": item.get("exit_code"),
                        "status": item.get("status"),
                    },
                )
            ]
        if item_type == "file_change" and item.get("status") == "completed":
            changes = item.get("changes") or []
            paths = [change.get("path") for change in changes if change.get("path")]
            patch = git_diff(self.workdir, paths) if self.workdir else None
            return [("diff", {"changes": changes, "patch": patch})]
        if item_type == "mcp_tool_call":
            return [
                (
                    "tool_call",
                    {
                        "tool": f"{item.get('server')}/{item.get('tool')}",
                        "callId": item.get("id"),
                        "arguments": item.get("arguments"),
                        "status": item.get("status"),
                        "result": item.get("result"),
                        "error": item.get("error"),
                    },
                )
            ]
        if item_type == "web_search":
            return [
                (
                    "tool_call",
                    {
                        "tool": "web_search",
                        "callId": item.get("id"),
                        "query": item.get("query"),
                        "action": item.get("action"),
                        "status": "completed",
                    },
                )
            ]
        if item_type == "todo_list":
            return [("tool_call", {"tool": "todo_list", "callId": item.get("id"), "items": item.get("items", [])})]
        if item_type == "error":
            return [("error", {"severity": "warning", "message": item.get("message")})]
        return []

    @staticmethod
    def _usage(usage: JsonObject) -> JsonObject:
        payload = {
            "inputTokens": usage.get("input_tokens"),
            "cachedInputTokens": usage.get("cached_input_tokens"),
            "outputTokens": usage.get("output_tokens"),
            "scope": "thread-cumulative",
        }
        if "cache_write_input_tokens" in usage:
            payload["cacheWriteInputTokens"] = usage["cache_write_input_tokens"]
        if "reasoning_output_tokens" in usage:
            payload["reasoningOutputTokens"] = usage["reasoning_output_tokens"]
        return payload

    def no_outcome(self, *, exit_code: int, stderr_tail: str) -> TurnResult:
        if self.lines == 0:
            return TurnResult(
                "failed",
                "backend-unavailable",
                f"codex exited {exit_code} before its first line: {stderr_tail}".strip(),
                self.thread_id,
            )
        return TurnResult(
            "failed", "agent-failed", f"codex stopped (exit {exit_code}) without ending the turn", self.thread_id
        )


class CodexBackend(Backend):
    """`AGENTRUN_CODEX_BIN` (default `codex`) and `AGENTRUN_CODEX_ARGS` (extra exec flags, shell
    words, e.g. the model provider) choose the CLI. The sandbox is workspace-write."""

    profile = "codex"

    def command(self, *, prompt: str, thread_id: str | None, workdir: str) -> tuple[list[str], dict[str, str], Parser]:
        argv = [
            os.environ.get("AGENTRUN_CODEX_BIN", "codex"),
            "exec",
            "--json",
            "--skip-git-repo-check",
            "-C",
            workdir,
            "-s",
            os.environ.get("AGENTRUN_CODEX_SANDBOX", "workspace-write"),
            *shlex.split(os.environ.get("AGENTRUN_CODEX_ARGS", "")),
        ]
        if thread_id:
            argv += ["resume", thread_id]
        return [*argv, prompt], {}, CodexParser(workdir)
