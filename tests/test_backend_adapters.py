"""The Codex and Claude Code adapters on real captures of the CLIs (tests/fixtures, copied from
the shared agent-cli-formats), replayed line by line; and every adapter on hostile output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner.backends.base import AgentProcess
from runner.backends.claude import ClaudeParser, patch_from
from runner.backends.codex import CodexParser, failure_kind_for
from runner.backends.echo import EchoBackend, EchoParser

FIXTURES = Path(__file__).parent / "fixtures"


def replay(parser, name, *, exit_code=0, cancelled=False):
    events = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip():
            events.extend(parser.feed(json.loads(line)))
    return events, parser.finish(exit_code=exit_code, cancelled=cancelled, stderr_tail="stderr tail")


def of_type(events, event_type):
    return [payload for kind, payload in events if kind == event_type]


# --- codex -------------------------------------------------------------------------------------


def test_codex_success():
    events, result = replay(CodexParser(), "codex-exec-success.jsonl")
    assert result.terminal_status == "completed" and result.failure_kind is None
    assert result.thread_id == "01a21acf-5055-7ff0-890a-f9debe69d115"
    kinds = [kind for kind, _ in events]
    assert kinds.count("reasoning") == 3 and kinds.count("assistant_message") == 1
    assert of_type(events, "assistant_message")[0]["text"].startswith("Updated `greet.py`")
    outputs = of_type(events, "command_output")
    assert outputs[0]["command"] == "/bin/bash -lc 'cat greet.py'" and outputs[0]["exitCode"] == 0
    assert "Hello" in outputs[0]["output"]
    calls = of_type(events, "tool_call")
    assert {call["tool"] for call in calls} == {"shell", "web_search"}
    [diff] = of_type(events, "diff")
    assert diff["changes"] == [{"path": "/workspace/repo/greet.py", "kind": "update"}]
    [usage] = of_type(events, "usage")
    assert usage == {
        "inputTokens": 18600,
        "cachedInputTokens": 13824,
        "cacheWriteInputTokens": 0,
        "outputTokens": 225,
        "reasoningOutputTokens": 64,
        "scope": "thread-cumulative",
    }
    assert kinds[-1] == "usage"


def test_codex_failure_is_failed_with_the_model_error():
    events, result = replay(CodexParser(), "codex-exec-failure.jsonl", exit_code=1)
    assert result.terminal_status == "failed" and result.failure_kind == "agent-failed"
    assert "context window" in result.message
    failed = [o for o in of_type(events, "command_output") if o["status"] == "failed"]
    assert failed and failed[0]["exitCode"] == 1  # a failing command does not end the turn
    assert any(e["severity"] == "fatal" for e in of_type(events, "error"))
    mcp = [c for c in of_type(events, "tool_call") if "/" in c["tool"] and c["status"] == "failed"]
    assert mcp and "approval" in mcp[0]["error"]["message"]
    assert not of_type(events, "usage")


def test_codex_auth_error_is_backend_unavailable():
    _, result = replay(CodexParser(), "codex-exec-auth-error.jsonl", exit_code=1)
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")


def test_codex_resume_keeps_the_thread_and_reports_cumulative_usage():
    events, result = replay(CodexParser(), "codex-exec-resume.jsonl")
    assert result.thread_id == "01a21acf-5055-7ff0-890a-f9debe69d115" and result.terminal_status == "completed"
    assert of_type(events, "usage")[0]["inputTokens"] == 23800


def test_codex_interrupted_by_us_is_cancelled_and_otherwise_failed():
    _, ours = replay(CodexParser(), "codex-exec-interrupted.jsonl", exit_code=1, cancelled=True)
    assert (ours.terminal_status, ours.failure_kind) == ("cancelled", "cancelled")
    _, theirs = replay(CodexParser(), "codex-exec-interrupted.jsonl", exit_code=1)
    assert (theirs.terminal_status, theirs.failure_kind) == ("failed", "agent-failed")


def test_codex_mcp_success():
    events, result = replay(CodexParser(), "codex-exec-mcp.jsonl")
    done = [c for c in of_type(events, "tool_call") if c["status"] == "completed" and "/" in c["tool"]]
    assert done and done[0]["result"]["content"] and result.terminal_status == "completed"


def test_codex_without_a_line_is_backend_unavailable():
    result = CodexParser().finish(exit_code=1, cancelled=False, stderr_tail="thread/resume failed: no rollout")
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")
    assert "no rollout" in result.message


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("unexpected status 401 Unauthorized: bad key", "backend-unavailable"),
        ("unexpected status 503 Service Unavailable", "backend-unavailable"),
        ("Codex ran out of room in the model's context window", "agent-failed"),
    ],
)
def test_codex_failure_kind_policy(message, kind):
    assert failure_kind_for(message) == kind


def test_codex_file_change_patch_comes_from_git(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "greet.py").write_text("old\n")
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "add", "."], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"], cwd=tmp_path, check=True)
    (tmp_path / "greet.py").write_text("new\n")
    parser = CodexParser(str(tmp_path))
    [(kind, payload)] = parser.feed(
        {
            "type": "item.completed",
            "item": {
                "id": "item_4",
                "type": "file_change",
                "status": "completed",
                "changes": [{"path": str(tmp_path / "greet.py"), "kind": "update"}],
            },
        }
    )
    assert kind == "diff" and "-old" in payload["patch"] and "+new" in payload["patch"]


# --- claude code ---------------------------------------------------------------------------------


def test_claude_success():
    events, result = replay(ClaudeParser(), "claude-stream-success.jsonl")
    assert result.terminal_status == "completed" and result.thread_id == "c7a029fc-5db7-441c-83c3-17367b3b1fde"
    texts = [m["text"] for m in of_type(events, "assistant_message")]
    assert texts[0].startswith("I'll read") and texts[-1].startswith("Fixed `greet()`")
    assert of_type(events, "reasoning")
    [output] = of_type(events, "command_output")
    assert output["output"] == "Hello, Ada!" and output["isError"] is False and "python3" in output["command"]
    [diff] = of_type(events, "diff")
    assert diff["path"] == "/workspace/repo/greet.py"
    assert '+    return f"Hello, {name}!"' in diff["patch"] and diff["patch"].startswith("--- a/")
    calls = of_type(events, "tool_call")
    assert {c["tool"] for c in calls if c["status"] == "in_progress"} == {"Read", "Edit", "Bash"}
    [usage] = of_type(events, "usage")
    assert usage["costUsd"] > 0 and usage["scope"] == "run"


def test_claude_max_turns_with_a_denial_is_blocked():
    events, result = replay(ClaudeParser(), "claude-stream-error.jsonl", exit_code=1)
    assert result.terminal_status == "blocked" and result.failure_kind == "agent-failed"
    assert "maximum number of turns" in result.message
    assert any(e.get("kind") == "permission-denied" for e in of_type(events, "error"))
    assert any(o["isError"] for o in of_type(events, "command_output"))


def test_claude_api_error_is_backend_unavailable():
    events, result = replay(ClaudeParser(), "claude-stream-api-error.jsonl", exit_code=1)
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")
    assert [e for e in of_type(events, "error") if e.get("retrying")]
    assert [e for e in of_type(events, "error") if e["severity"] == "fatal"]


def test_claude_interrupted_by_us_is_cancelled_and_otherwise_failed():
    _, ours = replay(ClaudeParser(), "claude-stream-interrupted.jsonl", cancelled=True)
    assert ours.terminal_status == "cancelled"
    _, theirs = replay(ClaudeParser(), "claude-stream-interrupted.jsonl")
    assert (theirs.terminal_status, theirs.failure_kind) == ("failed", "agent-failed")


def test_claude_resume_keeps_the_session():
    _, first = replay(ClaudeParser(), "claude-stream-success.jsonl")
    _, resumed = replay(ClaudeParser(), "claude-stream-resume.jsonl")
    assert resumed.thread_id == first.thread_id and resumed.terminal_status == "completed"


def test_claude_resume_of_an_unknown_session_fails():
    _, result = replay(ClaudeParser(), "claude-stream-resume-missing.jsonl", exit_code=1)
    assert result.terminal_status == "failed" and "No conversation found" in result.message


def test_claude_without_a_result_is_backend_unavailable():
    result = ClaudeParser().finish(exit_code=1, cancelled=False, stderr_tail="requires --verbose")
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")


def test_patch_from_structured_patch():
    patch = patch_from("f.py", [{"oldStart": 1, "oldLines": 1, "newStart": 1, "newLines": 1, "lines": ["-a", "+b"]}])
    assert patch == "--- a/f.py\n+++ b/f.py\n@@ -1,1 +1,1 @@\n-a\n+b\n"
    assert patch_from("f.py", None) is None


# --- hostile output -------------------------------------------------------------------------------
# An agent's stdout is bytes: invalid UTF-8 (a tool's binary output, a character cut in two) and
# NULs must reach the parser as text, and one line a parser cannot read must not end the turn.


def run_agent(parser, tmp_path, stdout: bytes, stderr: bytes = b"", exit_code: int = 0):
    """A fake agent printing `stdout` and `stderr` as raw bytes, run as a backend runs its CLI."""
    script = (
        f"import sys; sys.stdout.buffer.write({stdout!r}); sys.stderr.buffer.write({stderr!r}); sys.exit({exit_code})"
    )
    events = []
    process = AgentProcess(
        [sys.executable, "-c", script],
        cwd=str(tmp_path),
        env={},
        parser=parser,
        emit=lambda kind, payload: events.append((kind, payload)),
    )
    return events, process.wait()


def test_codex_output_with_invalid_utf8_and_nul_is_read_with_replacement(tmp_path):
    stdout = (
        b"\n".join(
            [
                b'{"type":"thread.started","thread_id":"t-1"}',
                b"\xff\xfe not a JSON line",
                b'{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"cat bin",'
                b'"aggregated_output":"ok \xff\xfe\\u0000 end","exit_code":0,"status":"completed"}}',
                b'{"type":"item.completed","item":{"id":"i2","type":"agent_message","text":"caf\xc3"}}',
                b'{"type":"turn.completed","usage":{"input_tokens":1}}',
            ]
        )
        + b"\n"
    )
    events, result = run_agent(CodexParser(), tmp_path, stdout, stderr=b"warn \xff\n")
    assert result.terminal_status == "completed" and result.thread_id == "t-1"
    [output] = of_type(events, "command_output")
    assert output["output"] == "ok \ufffd\ufffd\x00 end"
    assert of_type(events, "assistant_message") == [{"text": "caf\ufffd"}]


def test_claude_output_with_invalid_utf8_and_nul_is_read_with_replacement(tmp_path):
    stdout = (
        b"\n".join(
            [
                b'{"type":"system","subtype":"init","session_id":"s-1"}',
                b'{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","id":"tu1","name":"Bash",'
                b'"input":{"command":"cat bin"}}]}}',
                b'{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"tu1",'
                b'"content":"a\xffb\\u0000c"}]}}',
                b'{"type":"assistant","message":{"id":"m2","content":["not a block"]}}',  # unreadable: skipped
                b'{"type":"assistant","message":{"id":"m3","content":[{"type":"text","text":"done \xe2\x82"}]}}',
                b'{"type":"result","subtype":"success","is_error":false,"usage":{}}',
            ]
        )
        + b"\n"
    )
    events, result = run_agent(ClaudeParser(), tmp_path, stdout)
    assert result.terminal_status == "completed" and result.thread_id == "s-1"
    [output] = of_type(events, "command_output")
    assert output == {"command": "cat bin", "output": "a\ufffdb\x00c", "isError": False}
    assert [m["text"] for m in of_type(events, "assistant_message")] == ["done \ufffd"]


def test_echo_output_with_invalid_utf8_and_nul_is_read_with_replacement(tmp_path):
    stdout = (
        b'{"type":"thread","id":"e-1"}\n{"type":"output","command":"x","output":"a\xffb\\u0000","exitCode":0}\n'
        b'{"type":"done"}\n'
    )
    events, result = run_agent(EchoParser(), tmp_path, stdout, stderr=b"\xc3\x28\n", exit_code=0)
    assert result.terminal_status == "completed"
    assert of_type(events, "command_output") == [{"command": "x", "output": "a\ufffdb\x00", "exitCode": 0}]


def test_an_agent_that_dies_printing_invalid_utf8_fails_the_turn_with_its_stderr(tmp_path):
    _, result = run_agent(CodexParser(), tmp_path, b"", stderr=b"fatal: \xff\xfe bad\n", exit_code=2)
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")
    assert "fatal: \ufffd\ufffd bad" in result.message


def test_the_echo_backend_carries_nul_and_invalid_utf8_from_a_command(tmp_path):
    events = []
    process = EchoBackend().start(
        prompt="run: printf 'a\\000b \\377 c'",
        thread_id=None,
        workdir=str(tmp_path),
        emit=lambda kind, payload: events.append((kind, payload)),
    )
    assert process.wait().terminal_status == "completed"
    assert [p["output"] for p in of_type(events, "command_output")] == ["a\x00b \ufffd c"]
