"""Agent backends: each runs an agent as a child process speaking JSON lines, and maps its lines
to agentrun events. `echo` is a small deterministic agent of our own; `codex` and `claude-code`
drive the real CLIs (`codex exec --json`, `claude -p --output-format stream-json --verbose`)."""

from __future__ import annotations

from runner.backends.base import AgentProcess, Backend, TurnResult
from runner.backends.claude import ClaudeBackend
from runner.backends.codex import CodexBackend
from runner.backends.echo import EchoBackend

BACKENDS = {"echo": EchoBackend, "codex": CodexBackend, "claude-code": ClaudeBackend}


def backend_for(profile: str) -> Backend:
    try:
        return BACKENDS[profile]()
    except KeyError:
        raise ValueError(f"no backend for profile {profile!r}") from None


__all__ = ["AgentProcess", "Backend", "TurnResult", "backend_for"]
