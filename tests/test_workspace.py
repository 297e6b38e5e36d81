"""A run's git workspace (runner.workspace) through the reference runner against a live server:
checked out before the first turn, reported after each, kept across a session's runs, committed
and pushed on request, its failures and its credentials. Repositories are real: bare ones made
with git in tmp_path, served over file:// or over HTTP by `git http-backend`."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.forms.models import model_to_dict

from runner import workspace
from runner.cli import Out, follow, main
from runner.client import AgentRunClient
from runner.payloads import MAX_PAYLOAD_BYTES, json_bytes
from runner.workspace import GitWorkspace, Workspace, WorkspaceError, branch_name, git_environment, strip_userinfo
from runs import services
from runs.models import Command, Run
from tests.helpers import Threads, events_of, make_run, start_runner, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
TEST_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **TEST_IDENTITY}, capture_output=True, text=True, check=True
    )
    return done.stdout.rstrip("\n")


@dataclass
class Origin:
    """A bare repository with one commit on `main` (README.md, sub/notes.txt)."""

    bare: Path
    base: str

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def push_commit(self, tmp_path: Path, name: str, text: str) -> str:
        """A new commit on main, made elsewhere and pushed: the remote moves on."""
        clone = tmp_path / f"elsewhere-{name}"
        git("clone", "-q", self.url, str(clone))
        (clone / name).write_text(text)
        git("add", name, cwd=clone)
        git("commit", "-qm", f"add {name}", cwd=clone)
        git("push", "-q", "origin", "HEAD:main", cwd=clone)
        return git("rev-parse", "HEAD", cwd=clone)


@pytest.fixture
def origin(tmp_path):
    source = tmp_path / "source"
    git("init", "-q", "-b", "main", str(source))
    (source / "README.md").write_text("hello\n")
    (source / "sub").mkdir()
    (source / "sub" / "notes.txt").write_text("notes\n")
    git("add", "-A", cwd=source)
    git("commit", "-qm", "first", cwd=source)
    bare = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(source), str(bare))
    return Origin(bare, git("rev-parse", "HEAD", cwd=source))


def run_turns(live_server, keys, workdir: Path, prompts: list[str], **run_fields) -> Run:
    """A run with these turns, run to its end by the reference runner in `workdir`."""
    run = make_run(**run_fields)
    for prompt in prompts:
        services.command_create(run_id=run.id, command_type="turn", payload={"prompt": prompt})
    _, runner_thread = start_runner(live_server.url, keys[1], run.id, workdir)
    assert runner_thread.join(90) == [0]
    return Run.objects.get(pk=run.id)


def phase_payloads(run_id, phase):
    return [e.payload for e in events_of(run_id) if e.type == "backend_status" and e.payload.get("phase") == phase]


def workspace_diffs(run_id):
    return [e.payload for e in events_of(run_id) if e.type == "diff" and e.payload.get("scope") == "workspace"]


def test_a_fresh_workspace_is_checked_out_and_each_turn_reported_against_its_base(live_server, keys, tmp_path, origin):
    workdir = tmp_path / "ws"
    run = run_turns(
        live_server,
        keys,
        workdir,
        ["edit: README.md\nrun: echo new > added.txt"],
        session_id="ws-fresh",
        workspace_ref={"kind": "git", "url": origin.url},
    )
    assert (run.status, run.failure_kind) == ("completed", None)
    [ready] = phase_payloads(run.id, "workspace-ready")
    assert ready == {
        "phase": "workspace-ready",
        "url": origin.url,
        "ref": None,
        "commit": origin.base,
        "base": origin.base,
        "upstream": origin.base,
        "branch": "agentrun/ws-fresh",
        "path": None,
        "fresh": True,
    }
    [command] = Command.objects.filter(run_id=run.id)
    [diff] = workspace_diffs(run.id)
    [summary] = phase_payloads(run.id, "workspace-summary")
    # The patch is the tree against the base: the tracked edit exactly as git shows it, and the
    # untracked file as a new one.
    assert git("diff", origin.base, "--", "README.md", cwd=workdir) + "\n" in diff["patch"]
    assert "diff --git a/added.txt b/added.txt\nnew file mode 100644\n" in diff["patch"]
    assert diff["patch"].endswith("+++ b/added.txt\n@@ -0,0 +1 @@\n+new\n")
    assert (diff["base"], diff["head"], diff["commandId"]) == (origin.base, origin.base, command.id)
    assert summary == {
        "phase": "workspace-summary",
        "commandId": command.id,
        "filesChanged": 2,
        "insertions": 2,
        "deletions": 0,
        "head": origin.base,
        "base": origin.base,
        "files": [
            {"path": "README.md", "insertions": 1, "deletions": 0},
            {"path": "added.txt", "insertions": 1, "deletions": 0},
        ],
    }
    # The user's index is untouched: the edit unstaged, the new file untracked.
    assert git("status", "--porcelain", cwd=workdir) == " M README.md\n?? added.txt"
    assert git("symbolic-ref", "--short", "HEAD", cwd=workdir) == "agentrun/ws-fresh"
    assert git("config", "agentrun.base", cwd=workdir) == origin.base
    assert git("rev-parse", "--is-shallow-repository", cwd=workdir) == "true"
    # Prepared before the turn; reported before the turn's end was recorded.
    order = [(e.type, e.payload.get("phase"), e.payload.get("scope")) for e in events_of(run.id)]
    assert order.index(("backend_status", "workspace-ready", None)) < order.index(("assistant_message", None, None))
    assert order.index(("backend_status", "workspace-summary", None)) < order.index(
        ("backend_status", "command-terminal", None)
    )


def test_a_later_run_of_the_session_fetches_and_keeps_the_workspace_as_it_was_left(live_server, keys, tmp_path, origin):
    workdir, ref = tmp_path / "ws", {"kind": "git", "url": origin.url, "ref": "main"}
    first = run_turns(live_server, keys, workdir, ["edit: README.md"], session_id="ws-later", workspace_ref=ref)
    assert first.status == "completed"
    # Between the runs: someone edits and stages in the workspace, and the remote moves on.
    with open(workdir / "README.md", "a") as readme:
        readme.write("local change\n")
    (workdir / "local.txt").write_text("staged\n")
    git("add", "local.txt", cwd=workdir)
    upstream = origin.push_commit(tmp_path, "upstream.txt", "from elsewhere\n")

    second = run_turns(live_server, keys, workdir, ["edit: README.md"], session_id="ws-later", workspace_ref=ref)
    assert second.status == "completed"
    [ready] = phase_payloads(second.id, "workspace-ready")
    assert (ready["fresh"], ready["commit"], ready["base"], ready["upstream"]) == (
        False,
        origin.base,
        origin.base,
        upstream,
    )
    lines = (workdir / "README.md").read_text().splitlines()
    assert lines[0] == "hello" and lines[2] == "local change" and len(lines) == 4
    assert lines[1].startswith("edited by echo") and lines[3].startswith("edited by echo")
    assert git("diff", "--cached", "--name-only", cwd=workdir) == "local.txt"  # still staged
    assert git("rev-parse", "HEAD", cwd=workdir) == origin.base
    assert git("rev-parse", "FETCH_HEAD", cwd=workdir) == upstream
    assert not (workdir / "upstream.txt").exists()  # fetched, not merged
    [diff] = workspace_diffs(second.id)
    assert "+local change\n" in diff["patch"] and "+++ b/local.txt\n" in diff["patch"]
    [summary] = phase_payloads(second.id, "workspace-summary")
    assert summary["files"] == [
        {"path": "README.md", "insertions": 3, "deletions": 0},
        {"path": "local.txt", "insertions": 1, "deletions": 0},
    ]


def test_commit_and_push_put_each_turn_on_the_runs_branch_in_the_remote(
    live_server, keys, tmp_path, origin, monkeypatch
):
    for name in TEST_IDENTITY:
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "ws"
    run = run_turns(
        live_server,
        keys,
        workdir,
        ["edit: README.md", "nothing to change"],
        session_id="ws-push",
        workspace_ref={"kind": "git", "url": origin.url, "commit": True, "push": True},
    )
    assert run.status == "completed"
    first, second = phase_payloads(run.id, "workspace-summary")
    committed = first["committed"]
    assert first["pushed"] is True and first["head"] == committed and first["base"] == origin.base
    assert "committed" not in second and second["pushed"] is True and second["head"] == committed
    assert second["filesChanged"] == 1  # still measured against the base
    remote = ["--git-dir", str(origin.bare)]
    assert git(*remote, "rev-parse", "refs/heads/agentrun/ws-push") == committed
    assert git(*remote, "rev-parse", "refs/heads/main") == origin.base
    assert git(*remote, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%P", committed) == (
        f"agentrun <agentrun@localhost>|agentrun <agentrun@localhost>|{origin.base}"
    )
    assert git("status", "--porcelain", cwd=workdir) == ""
    [diff, _] = workspace_diffs(run.id)
    assert diff["head"] == committed and "+edited by echo" in diff["patch"]


def test_a_failed_push_is_said_and_the_turn_completes(live_server, keys, tmp_path, origin):
    workdir = tmp_path / "ws"
    ref = {"kind": "git", "url": origin.url, "commit": True, "push": True}
    run = make_run(session_id="ws-nopush", workspace_ref=ref)
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "edit: README.md"})
    # A hook of the remote refuses every push.
    hook = origin.bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are closed' >&2\nexit 1\n")
    hook.chmod(0o755)
    _, runner_thread = start_runner(live_server.url, keys[1], run.id, workdir)
    assert runner_thread.join(60) == [0]
    assert Run.objects.get(pk=run.id).status == "completed"
    [summary] = phase_payloads(run.id, "workspace-summary")
    assert "pushed" not in summary and "pushes are closed" in summary["pushError"] and summary["committed"]


def test_a_checkout_that_fails_ends_the_run_infra_failed_before_any_turn(live_server, keys, tmp_path, origin):
    workdir = tmp_path / "ws"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine\n")
    run = run_turns(
        live_server,
        keys,
        workdir,
        ["edit: README.md"],
        workspace_ref={"kind": "git", "url": origin.url, "ref": "no-such-branch"},
    )
    assert (run.status, run.failure_kind) == ("failed", "infra-failed")
    assert run.failure_message.startswith("git fetch failed:") and "no-such-branch" in run.failure_message
    assert Command.objects.get(run_id=run.id).state == "cancelled"  # no turn ran
    assert not any(e.type in ("assistant_message", "diff") for e in events_of(run.id))
    assert sorted(os.listdir(workdir)) == ["keep.txt"]  # as it was: the .git made is gone

    missing = run_turns(
        live_server,
        keys,
        tmp_path / "ws2",
        ["hello"],
        workspace_ref={"kind": "git", "url": (tmp_path / "nowhere.git").as_uri()},
    )
    assert (missing.status, missing.failure_kind) == ("failed", "infra-failed")
    assert "nowhere.git" in missing.failure_message


def test_files_already_in_the_directory_are_never_overwritten(live_server, keys, tmp_path, origin):
    workdir = tmp_path / "ws"
    workdir.mkdir()
    (workdir / "README.md").write_text("not the repository's\n")
    clash = run_turns(live_server, keys, workdir, ["hello"], workspace_ref={"kind": "git", "url": origin.url})
    assert (clash.status, clash.failure_kind) == ("failed", "infra-failed")
    assert "README.md" in clash.failure_message
    assert (workdir / "README.md").read_text() == "not the repository's\n" and not (workdir / ".git").exists()

    other = tmp_path / "ws-other"
    other.mkdir()
    (other / "lost+found").mkdir()
    (other / "lost+found" / "#123").write_text("a volume's, not the agent's\n")
    kept = run_turns(live_server, keys, other, ["hello"], workspace_ref={"kind": "git", "url": origin.url})
    assert kept.status == "completed" and (other / "lost+found" / "#123").exists() and (other / "README.md").exists()
    [summary] = phase_payloads(kept.id, "workspace-summary")
    assert summary["filesChanged"] == 0 and summary["files"] == []


def test_the_agent_works_in_the_workspaces_path(live_server, keys, tmp_path, origin):
    workdir = tmp_path / "ws"
    run = run_turns(
        live_server, keys, workdir, ["edit: notes.txt"], workspace_ref={"kind": "git", "url": origin.url, "path": "sub"}
    )
    assert run.status == "completed"
    [ready] = phase_payloads(run.id, "workspace-ready")
    assert ready["path"] == "sub"
    assert (workdir / "sub" / "notes.txt").read_text().startswith("notes\nedited by echo")
    [summary] = phase_payloads(run.id, "workspace-summary")
    assert summary["files"] == [{"path": "sub/notes.txt", "insertions": 1, "deletions": 0}]

    missing = run_turns(
        live_server,
        keys,
        tmp_path / "ws2",
        ["hello"],
        workspace_ref={"kind": "git", "url": origin.url, "path": "nope"},
    )
    assert (missing.status, missing.failure_kind) == ("failed", "infra-failed")
    assert missing.failure_message == "path 'nope' is not a directory of the checkout"


def test_a_huge_workspace_diff_arrives_shortened(live_server, keys, tmp_path, origin):
    run = run_turns(
        live_server,
        keys,
        tmp_path / "ws",
        ["run: head -c 1500000 /dev/zero | tr '\\0' x > big.txt"],
        workspace_ref={"kind": "git", "url": origin.url},
    )
    assert run.status == "completed"
    [diff] = workspace_diffs(run.id)
    assert diff["truncatedBytes"] > 1_000_000 and "bytes cut]…" in diff["patch"]
    assert len(json_bytes(diff)) <= MAX_PAYLOAD_BYTES
    assert diff["patch"].startswith("diff --git a/big.txt b/big.txt\nnew file mode 100644\n")
    [summary] = phase_payloads(run.id, "workspace-summary")
    assert summary["files"] == [{"path": "big.txt", "insertions": 1, "deletions": 0}]


def test_a_report_that_fails_is_said_and_never_fails_the_turn(live_server, keys, tmp_path, origin):
    """The agent removes the workspace's .git: the report fails, and git never falls back on a
    repository the workspace happens to be inside."""
    outer = tmp_path / "outer"
    git("init", "-q", str(outer))
    run = run_turns(
        live_server,
        keys,
        outer / "ws",
        ["run: rm -rf .git", "edit: README.md"],
        workspace_ref={"kind": "git", "url": origin.url, "commit": True},
    )
    assert run.status == "completed"
    assert [c.state for c in Command.objects.filter(run_id=run.id).order_by("seq")] == ["completed", "completed"]
    failures = phase_payloads(run.id, "workspace-report-failed")
    assert [f["message"] for f in failures] == ["the workspace has no base commit (agentrun.base)"] * 2
    assert not workspace_diffs(run.id) and not phase_payloads(run.id, "workspace-summary")
    assert git("status", "--porcelain", cwd=outer) == "?? ws/"  # nothing staged or committed there
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=outer, capture_output=True).returncode != 0


def test_a_run_without_a_git_workspace_is_unchanged(live_server, keys, tmp_path):
    for number, ref in enumerate([None, {"kind": "volume", "name": "scratch"}]):
        workdir = tmp_path / f"plain-{number}"
        workdir.mkdir()
        run = run_turns(live_server, keys, workdir, ["edit: notes.txt"], workspace_ref=ref)
        assert run.status == "completed"
        assert not (workdir / ".git").exists() and (workdir / "notes.txt").exists()
        assert [e.payload.get("path") for e in events_of(run.id) if e.type == "diff"] == ["notes.txt"]
        assert not any(str(e.payload.get("phase", "")).startswith("workspace") for e in events_of(run.id))


class GitOverHttp(BaseHTTPRequestHandler):
    """Smart HTTP through `git http-backend`, for callers sending the token as Basic auth."""

    root: Path
    token: str

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def serve(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        expected = "Basic " + base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
        separator = b"\r\n\r\n" if b"\r\n\r\n" in done.stdout else b"\n\n"
        head, _, content = done.stdout.partition(separator)
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


@pytest.fixture
def http_origin(origin):
    """The origin served over HTTP, to a caller with the right token only; yields (url, token)."""
    token = "tok-" + os.urandom(16).hex()  # looks like no known key: only the runner can hide it
    handler = type("Handler", (GitOverHttp,), {"root": origin.bare.parent, "token": token})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{origin.bare.name}", token
    server.shutdown()
    server.server_close()


def test_a_token_reaches_git_only_through_the_environment(
    live_server, keys, tmp_path, origin, http_origin, monkeypatch, caplog
):
    url, token = http_origin
    wrong = "tok-" + os.urandom(16).hex()
    monkeypatch.setenv("AGENTRUN_TEST_GIT_TOKEN", token)
    monkeypatch.setenv("AGENTRUN_TEST_WRONG_TOKEN", wrong)
    # Every git the runner starts goes through a wrapper that writes down its argv.
    argv_log, wrapper = tmp_path / "argv.log", tmp_path / "bin" / "git"
    wrapper.parent.mkdir()
    real_git = subprocess.run(["which", "git"], capture_output=True, text=True, check=True).stdout.strip()
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec {real_git} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.DEBUG)

    workdir = tmp_path / "ws"
    ref = {"kind": "git", "url": url, "credentialsRef": "AGENTRUN_TEST_GIT_TOKEN", "commit": True, "push": True}
    good = run_turns(live_server, keys, workdir, ["edit: README.md"], session_id="ws-http", workspace_ref=ref)
    assert good.status == "completed", good.failure_message
    [summary] = phase_payloads(good.id, "workspace-summary")
    assert summary["pushed"] is True
    assert git("--git-dir", str(origin.bare), "rev-parse", "refs/heads/agentrun/ws-http") == summary["committed"]

    bad = run_turns(
        live_server,
        keys,
        tmp_path / "ws-bad",
        ["hello"],
        workspace_ref={**ref, "credentialsRef": "AGENTRUN_TEST_WRONG_TOKEN"},
    )
    assert (bad.status, bad.failure_kind) == ("failed", "infra-failed")
    assert bad.failure_message.startswith("git fetch failed:")

    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    wrong_basic = base64.b64encode(f"x-access-token:{wrong}".encode()).decode()
    places = {
        "argv": argv_log.read_text(),
        ".git/config": (workdir / ".git" / "config").read_text(),
        "events": json.dumps([e.payload for run in (good, bad) for e in events_of(run.id)]),
        "runs": json.dumps([model_to_dict(Run.objects.get(pk=run.id)) for run in (good, bad)], default=str),
        "commands": json.dumps(
            [model_to_dict(c) for c in Command.objects.filter(run_id__in=[good.id, bad.id])], default=str
        ),
        "logs": caplog.text,
    }
    assert "fetch" in places["argv"] and "push" in places["argv"]
    for where, text in places.items():
        for secret in (token, basic, wrong, wrong_basic):
            assert secret not in text, where


def test_a_git_call_that_hangs_stops_when_the_run_ends(tmp_path):
    """A remote that accepts the connection and never answers: the fetch stops once `stop` is set
    (the run ended, the lease was lost), its helpers with it, well before its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        stop = threading.Event()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/r.git"
        workspace = Workspace(GitWorkspace(url), tmp_path / "ws", branch="agentrun/x", run_id="r", stop=stop)
        threading.Timer(1.0, stop.set).start()
        started = time.monotonic()
        with pytest.raises(WorkspaceError, match=r"^git fetch was stopped: the run ended$"):
            workspace.prepare()
        assert time.monotonic() - started < 10
    assert not (tmp_path / "ws" / ".git").exists()


def test_messages_are_redacted_and_ids_make_valid_branches():
    assert strip_userinfo("fatal: unable to access 'https://bob:hunter2@example.com/r.git/'") == (
        "fatal: unable to access 'https://example.com/r.git/'"
    )
    env, secrets = git_environment("https://example.com/o/r.git", "abc123", {"GIT_CONFIG_COUNT": "1"})
    assert env["GIT_CONFIG_KEY_1"] == "http.https://example.com/.extraHeader" and env["GIT_CONFIG_COUNT"] == "2"
    assert env["GIT_TERMINAL_PROMPT"] == "0" and "abc123" in secrets
    assert git_environment("git@example.com:o/r.git", None, {})[1] == []
    for owner, branch in [("ws-1", "agentrun/ws-1"), ("run_abc.def", "agentrun/run_abc.def")]:
        assert branch_name(owner) == branch
    for owner in ["owner/repo#42", "..", "a b", "x.lock", "-lead", "ünï"]:
        name = branch_name(owner)
        assert subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True).returncode == 0
    assert branch_name("a/b") != branch_name("a-b")
    assert GitWorkspace.from_ref({"kind": "volume"}) is None and GitWorkspace.from_ref(None) is None
    assert GitWorkspace.from_ref({"kind": "git", "url": "file:///r", "depth": 0}) == GitWorkspace("file:///r", depth=0)
    for bad in [{"path": "../up"}, {"path": "/abs"}, {"depth": -1}, {"ref": "--upload-pack=x"}, {"url": ""}]:
        with pytest.raises(WorkspaceError):
            GitWorkspace.from_ref({"kind": "git", "url": "file:///r", **bad})


def test_the_cli_builds_the_workspace_and_prints_it(live_server, keys, tmp_path, origin, capsys):
    """`run --repo ... --follow` as a user types it, the runner started once the run exists;
    then `events --follow` and `diff`."""
    cli = ["--url", live_server.url, "--key", keys[0]]
    argv = [*cli, "run", "--repo", origin.url, "--ref", "main", "--session", "ws-cli", "--commit", "--follow"]
    following = Threads(1, lambda _: main([*argv, "edit: README.md"]))
    assert wait_for(lambda: Run.objects.filter(session_id="ws-cli").exists())
    run = Run.objects.get(session_id="ws-cli")
    assert run.workspace_ref == {"kind": "git", "url": origin.url, "ref": "main", "commit": True}
    _, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path / "ws")
    assert runner_thread.join(60) == [0] and following.join(60) == [0]
    printed = capsys.readouterr().out
    [summary] = phase_payloads(run.id, "workspace-summary")
    [diff] = workspace_diffs(run.id)
    committed = summary["committed"]
    assert f"workspace {origin.url} @ main: {origin.base[:12]} (checked out)" in printed
    assert f"workspace diff {origin.base[:12]}..{committed[:12]}" in printed
    assert f"1 file changed, +1 -0, head {committed[:12]}, committed {committed[:12]}" in printed
    for line in diff["patch"].splitlines():
        assert f"     {line}\n" in printed

    out = Out(False, io.StringIO())
    with AgentRunClient(live_server.url, keys[0]) as reader:
        assert follow(reader, out, run.id) == 0
    assert f"1 file changed, +1 -0, head {committed[:12]}, committed {committed[:12]}" in out.stream.getvalue()

    assert main([*cli, "diff", run.id]) == 0
    assert capsys.readouterr().out == diff["patch"]
    plain = make_run()
    assert main([*cli, "diff", plain.id]) == 1
    assert capsys.readouterr().err == f"run {plain.id} has no workspace diff (yet)\n"
    with pytest.raises(SystemExit):
        main([*cli, "run", "--commit", "hello"])  # a workspace option without --repo
    assert "--commit need --repo" in capsys.readouterr().err


def test_the_cli_follows_a_run_whose_checkout_failed_to_its_end_and_says_why(live_server, keys, tmp_path, capsys):
    cli = ["--url", live_server.url, "--key", keys[0]]
    missing = f"file://{tmp_path}/missing.git"
    following = Threads(1, lambda _: main([*cli, "run", "--repo", missing, "--session", "ws-bad", "--follow", "hi"]))
    assert wait_for(lambda: Run.objects.filter(session_id="ws-bad").exists())
    run = Run.objects.get(session_id="ws-bad")
    _, runner_thread = start_runner(live_server.url, keys[1], run.id, tmp_path / "ws")
    assert runner_thread.join(60) == [0] and following.join(60) == [1]  # the run failed
    printed = capsys.readouterr().out
    assert "== failed (infra-failed: git fetch failed: " in printed and "missing.git" in printed


def test_a_patch_is_read_from_git_no_larger_than_its_bound(live_server, keys, tmp_path, origin, monkeypatch):
    """The runner reads a patch's head and tail alone (MAX_PATCH_READ): what the agent wrote never
    sits in the runner's memory whole. The cut is counted with the sink's own."""
    monkeypatch.setattr(workspace, "MAX_PATCH_READ", 64 * 1024)
    run = run_turns(
        live_server,
        keys,
        tmp_path / "ws",
        ["run: (head -c 3000000 /dev/zero | tr '\\0' x; echo; echo THE-END) > big.txt"],
        workspace_ref={"kind": "git", "url": origin.url},
    )
    [diff] = workspace_diffs(run.id)
    assert diff["patch"].startswith("diff --git a/big.txt b/big.txt\n") and diff["patch"].endswith("+THE-END\n")
    assert diff["truncatedBytes"] > 3_000_000 - 64 * 1024


def test_head_and_tail(tmp_path):
    with (tmp_path / "f").open("w+b") as written:
        written.write(b"a" * 10 + "é".encode() + b"b" * 10)
        assert workspace._head_and_tail(written, 100) == ("a" * 10 + "é" + "b" * 10, 0)
        text, cut = workspace._head_and_tail(written, 10)
        assert (text, cut) == ("aaaaa…[12 bytes cut]…bbbbb", 12)
