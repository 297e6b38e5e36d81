"""The Codex and Claude Code backends driving the real CLIs (installed from npm) against
scripted model servers: a turn with a shell command and a file edit, a failing turn, a
cancelled turn, a resumed thread. Without the npm registry these skip, saying so."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from runner.backends.claude import ClaudeBackend
from runner.backends.codex import CodexBackend
from tests.helpers import Anthropic, Responses, claude_environment, install, wait_for

# Sleep lengths no other run of this suite on the machine uses, so pgrep finds only ours.
UNIQUE = f"{os.getpid() % 100000:05d}"


@pytest.fixture(scope="module")
def clis():
    return install()


def git_repo(path):
    path.mkdir()
    (path / "greet.py").write_text('def greet(name):\n    return "Hello " + name\n')
    for argv in (
        ["git", "init", "-q"],
        ["git", "add", "."],
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "start"],
    ):
        subprocess.run(argv, cwd=path, check=True)
    return path


class Turn:
    """One turn through a backend, its events collected as they come."""

    def __init__(self, backend, workdir, prompt="go", thread_id=None):
        self.events, self.seen = [], threading.Event()
        self.process = backend.start(prompt=prompt, thread_id=thread_id, workdir=str(workdir), emit=self.emit)

    def emit(self, kind, payload):
        self.events.append((kind, payload))
        self.seen.set()

    def wait(self):
        return self.process.wait()

    def of(self, kind):
        return [payload for event_kind, payload in self.events if event_kind == kind]


def still_running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


# --- codex -------------------------------------------------------------------------------------


@pytest.fixture
def codex(clis, tmp_path, monkeypatch):
    def configure(script):
        model = Responses(script)
        home = tmp_path / "home"
        (home / ".codex").mkdir(parents=True, exist_ok=True)
        provider = (
            f'model_providers.mock={{name="mock",base_url="{model.url}/v1",wire_api="responses",'
            'env_key="MOCK_API_KEY",request_max_retries=0,stream_max_retries=0}'
        )
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("CODEX_HOME", str(home / ".codex"))
        monkeypatch.setenv("MOCK_API_KEY", "mock")
        monkeypatch.setenv("AGENTRUN_CODEX_BIN", str(clis[0]))
        monkeypatch.setenv("AGENTRUN_CODEX_ARGS", f"-m gpt-5 -c model_provider=mock -c '{provider}'")
        return model

    return configure


PATCH = """apply_patch <<'EOF'
*** Begin Patch
*** Update File: greet.py
@@
 def greet(name):
-    return "Hello " + name
+    return f"Hello, {name}!"
*** End Patch
EOF"""


def test_codex_turn_with_a_command_and_an_edit_then_a_resume(codex, tmp_path):
    repo = git_repo(tmp_path / "repo")
    model = codex(
        [
            {"tool": ("exec_command", {"cmd": "echo hello-codex"})},
            {"tool": ("exec_command", {"cmd": PATCH})},
            {"text": "Fixed greet."},
        ]
    )
    turn = Turn(CodexBackend(), repo)
    result = turn.wait()
    assert result.terminal_status == "completed", result
    assert result.thread_id
    [output] = [o for o in turn.of("command_output") if "hello-codex" in o["command"]]
    assert output["output"] == "hello-codex\n" and output["exitCode"] == 0
    [diff] = turn.of("diff")
    assert '+    return f"Hello, {name}!"' in diff["patch"]  # made with git diff in the workspace
    assert turn.of("assistant_message")[-1]["text"] == "Fixed greet."
    assert turn.of("usage")[0]["scope"] == "thread-cumulative"
    model.script.append({"text": "Still here."})
    again = Turn(CodexBackend(), repo, prompt="and now?", thread_id=result.thread_id)
    resumed = again.wait()
    assert resumed.terminal_status == "completed" and resumed.thread_id == result.thread_id
    assert again.of("assistant_message")[-1]["text"] == "Still here."


def test_codex_failing_turn(codex, tmp_path):
    codex([{"status": 400, "sticky": True}])
    turn = Turn(CodexBackend(), git_repo(tmp_path / "repo"))
    result = turn.wait()
    assert result.terminal_status == "failed" and result.failure_kind == "agent-failed" and result.message
    assert [e for e in turn.of("error") if e["severity"] == "fatal"]


def test_codex_cancelled_turn(codex, tmp_path):
    command = f"sleep 41.{UNIQUE}"  # pgrep must not find another test run's sleep on this machine
    codex([{"tool": ("exec_command", {"cmd": command})}, {"text": "never"}])
    turn = Turn(CodexBackend(), git_repo(tmp_path / "repo"))
    assert wait_for(lambda: still_running(command), 60)
    turn.process.cancel(grace_seconds=3)
    result = turn.wait()
    assert (result.terminal_status, result.failure_kind) == ("cancelled", "cancelled")
    assert not still_running(command)  # the whole process group is gone


# --- claude code ---------------------------------------------------------------------------------


@pytest.fixture
def claude(clis, tmp_path, monkeypatch):
    def configure(script):
        model = Anthropic(script)
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        for name, value in {
            "HOME": str(home),
            "ANTHROPIC_API_KEY": "sk-ant-mock",
            **claude_environment(model.url, clis[1]),
        }.items():
            monkeypatch.setenv(name, value)
        return model

    return configure


def test_claude_turn_with_a_command_and_an_edit_then_a_resume(claude, tmp_path):
    repo = git_repo(tmp_path / "repo")
    path = str(repo / "greet.py")
    model = claude(
        [
            {"tool": ("Read", {"file_path": path})},
            {
                "tool": (
                    "Edit",
                    {
                        "file_path": path,
                        "old_string": '    return "Hello " + name',
                        "new_string": '    return f"Hello, {name}!"',
                    },
                )
            },
            {"tool": ("Bash", {"command": "echo hello-claude", "description": "greet"})},
            {"text": "Fixed greet."},
        ]
    )
    turn = Turn(ClaudeBackend(), repo)
    result = turn.wait()
    assert result.terminal_status == "completed", (result, turn.events[-3:])
    [output] = turn.of("command_output")
    assert output["output"] == "hello-claude" and output["isError"] is False
    [diff] = turn.of("diff")
    assert diff["path"] == path and '+    return f"Hello, {name}!"' in diff["patch"]
    assert (repo / "greet.py").read_text().count("Hello, {name}!") == 1
    assert turn.of("assistant_message")[-1]["text"] == "Fixed greet."
    model.script.append({"text": "Still here."})
    again = Turn(ClaudeBackend(), repo, prompt="and now?", thread_id=result.thread_id)
    resumed = again.wait()
    assert resumed.terminal_status == "completed" and resumed.thread_id == result.thread_id
    assert again.of("assistant_message")[-1]["text"] == "Still here."


def test_claude_failing_turn(claude, tmp_path):
    claude([{"status": 500, "sticky": True}])
    turn = Turn(ClaudeBackend(), git_repo(tmp_path / "repo"))
    result = turn.wait()
    assert (result.terminal_status, result.failure_kind) == ("failed", "backend-unavailable")
    assert [e for e in turn.of("error") if e["severity"] == "fatal"]


def test_claude_cancelled_turn(claude, tmp_path):
    claude(
        [
            {
                "tool": (
                    "Bash",
                    {"command": f"python3 -c 'import time; time.sleep(42.{UNIQUE})'", "description": "wait"},
                )
            },
            {"text": "never"},
        ]
    )
    turn = Turn(ClaudeBackend(), git_repo(tmp_path / "repo"))
    assert wait_for(lambda: still_running(f"time.sleep.42.{UNIQUE}"), 60)
    turn.process.cancel(grace_seconds=5)
    result = turn.wait()
    assert (result.terminal_status, result.failure_kind) == ("cancelled", "cancelled")
    assert not still_running(f"time.sleep.42.{UNIQUE}")
