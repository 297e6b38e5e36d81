"""The Claude Code backend: `claude -p ... --output-format stream-json --verbose`, its lines
mapped to agentrun events (FORMATS.md §2 and §3.2). The next turn resumes the session."""

from __future__ import annotations

import os
import shlex

from runner.backends.base import AgentEvent, Backend, Outcome, Parser, TurnResult
from runner.records import JsonObject

EDIT_TOOLS = {"Edit", "Write", "MultiEdit", "NotebookEdit"}
UNAVAILABLE_STATUSES = {401, 403, 429, 529}


def patch_from(path: str | None, hunks: object) -> str | None:
    """A unified diff from Claude Code's structuredPatch."""
    if not isinstance(hunks, list) or not hunks:
        return None
    lines = [f"--- a/{path}", f"+++ b/{path}"]
    for hunk in hunks:
        lines.append(
            f"@@ -{hunk.get('oldStart')},{hunk.get('oldLines')} +{hunk.get('newStart')},{hunk.get('newLines')} @@"
        )
        lines.extend(hunk.get("lines") or [])
    return "\n".join(lines) + "\n"


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return ""


class ClaudeParser(Parser):
    def __init__(self) -> None:
        self.thread_id: str | None = None
        self.outcome: Outcome | None = None
        self.tools: dict[str, tuple[str, JsonObject]] = {}  # tool calls by id: (tool name, input)
        self.denied = False
        self.lines = 0

    def feed(self, record: JsonObject) -> list[AgentEvent]:
        self.lines += 1
        if record.get("session_id") and (self.thread_id is None or record.get("subtype") == "init"):
            self.thread_id = record["session_id"]
        kind, subtype = record.get("type"), record.get("subtype")
        if kind == "assistant":
            return self._assistant(record)
        if kind == "user":
            return self._user(record)
        if kind == "system" and subtype == "api_retry":
            return [
                (
                    "error",
                    {
                        "severity": "warning",
                        "retrying": True,
                        "status": record.get("error_status"),
                        "message": record.get("error"),
                    },
                )
            ]
        if kind == "system" and subtype == "permission_denied":
            self.denied = True
            return [
                (
                    "error",
                    {
                        "severity": "warning",
                        "kind": "permission-denied",
                        "tool": record.get("tool_name"),
                        "message": record.get("message"),
                    },
                )
            ]
        if kind == "result":
            return self._result(record)
        return []

    def _assistant(self, record: JsonObject) -> list[AgentEvent]:
        message = record.get("message") or {}
        if record.get("error") or record.get("is_api_error_message"):
            return [("error", {"severity": "fatal", "message": _text(message.get("content"))})]
        events = []
        for block in message.get("content") or []:
            block_type = block.get("type")
            if block_type == "text" and block.get("text"):
                events.append(("assistant_message", {"text": block["text"], "messageId": message.get("id")}))
            elif block_type == "thinking" and block.get("thinking"):
                events.append(("reasoning", {"text": block["thinking"]}))
            elif block_type == "tool_use":
                self.tools[block.get("id")] = (block.get("name"), block.get("input") or {})
                events.append(
                    (
                        "tool_call",
                        {
                            "callId": block.get("id"),
                            "tool": block.get("name"),
                            "input": block.get("input"),
                            "status": "in_progress",
                        },
                    )
                )
        return events

    def _user(self, record: JsonObject) -> list[AgentEvent]:
        content = (record.get("message") or {}).get("content")
        result = record.get("tool_use_result")
        events = []
        for block in content if isinstance(content, list) else []:
            if block.get("type") != "tool_result":
                continue
            call_id = block.get("tool_use_id")
            name, tool_input = self.tools.get(call_id, (None, {}))
            failed = block.get("is_error") is True
            if name == "Bash":
                events.append(
                    (
                        "command_output",
                        {
                            "command": tool_input.get("command"),
                            "output": _text(block.get("content")),
                            "isError": failed,
                        },
                    )
                )
            elif name in EDIT_TOOLS and isinstance(result, dict) and not failed:
                path = result.get("filePath") or tool_input.get("file_path")
                events.append(("diff", {"path": path, "patch": patch_from(path, result.get("structuredPatch"))}))
            else:
                events.append(
                    ("tool_call", {"callId": call_id, "tool": name, "status": "failed" if failed else "completed"})
                )
        return events

    def _result(self, record: JsonObject) -> list[AgentEvent]:
        subtype, errors = record.get("subtype"), record.get("errors") or []
        message = "; ".join(str(e) for e in errors) or (record.get("result") if record.get("is_error") else None)
        if subtype == "success" and not record.get("is_error"):
            self.outcome = ("completed", None, None)
        elif subtype == "success":  # an API error after the retries
            status = record.get("api_error_status")
            unavailable = status in UNAVAILABLE_STATUSES or (isinstance(status, int) and status >= 500)
            self.outcome = (
                "failed",
                "backend-unavailable" if unavailable else "agent-failed",
                message or f"API error {status}",
            )
        elif subtype == "error_during_execution" and str(record.get("terminal_reason", "")).startswith("aborted"):
            self.outcome = ("cancelled", "cancelled", "the turn was interrupted")
        else:
            status = "blocked" if record.get("permission_denials") else "failed"
            self.outcome = (status, "agent-failed", message or subtype)
        usage = record.get("usage") or {}
        return [
            (
                "usage",
                {
                    "inputTokens": usage.get("input_tokens"),
                    "cacheReadInputTokens": usage.get("cache_read_input_tokens"),
                    "cacheCreationInputTokens": usage.get("cache_creation_input_tokens"),
                    "outputTokens": usage.get("output_tokens"),
                    "costUsd": record.get("total_cost_usd"),
                    "modelUsage": record.get("modelUsage"),
                    "scope": "run",
                },
            )
        ]

    def finish(self, *, exit_code: int, cancelled: bool, stderr_tail: str) -> TurnResult:
        if not cancelled and self.outcome is not None and self.outcome[0] == "cancelled":
            self.outcome = ("failed", "agent-failed", self.outcome[2])  # interrupted, but not by us
        return super().finish(exit_code=exit_code, cancelled=cancelled, stderr_tail=stderr_tail)

    def no_outcome(self, *, exit_code: int, stderr_tail: str) -> TurnResult:
        return TurnResult(
            "failed",
            "backend-unavailable",
            f"claude exited {exit_code} without a result: {stderr_tail}".strip(),
            self.thread_id,
        )


class ClaudeBackend(Backend):
    """`AGENTRUN_CLAUDE_BIN` (default `claude`) and `AGENTRUN_CLAUDE_ARGS` (extra flags, shell
    words; default `--permission-mode acceptEdits`) choose the CLI."""

    profile = "claude-code"

    def command(self, *, prompt: str, thread_id: str | None, workdir: str) -> tuple[list[str], dict[str, str], Parser]:
        extra = shlex.split(os.environ.get("AGENTRUN_CLAUDE_ARGS", "--permission-mode acceptEdits"))
        argv = [
            os.environ.get("AGENTRUN_CLAUDE_BIN", "claude"),
            "-p",
            prompt,
            "--output-format",
            "stream-json",
            "--verbose",
            *extra,
        ]
        if thread_id:
            argv.append(f"--resume={thread_id}")
        return argv, {}, ClaudeParser()
