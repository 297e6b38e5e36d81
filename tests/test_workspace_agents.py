"""A real coding task end to end: the worker's local launcher starts the runner for a run whose
workspace is a git repository (a `file://` bare repo) and whose provider key comes from the
tenant's resource bundle (a file of the local secret store, not the worker's environment); the
real codex and claude-code CLIs (from npm, against the scripted model servers) edit the cloned
tree, and the run reports the diff and summary. The key reaches the model server and nothing
else: no event, run field or runner log holds it."""

from __future__ import annotations

import json
import subprocess

import pytest

from agentrun.launcher.local import LocalLauncher
from runs import launching, services
from runs.models import ResourceBundle, Run, RunEvent
from tests.helpers import PROJECT, TENANT, Anthropic, Responses, claude_environment, install, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

OPENAI_KEY = "sk-bundle-openai-0123456789abcdefghijkl"
ANTHROPIC_KEY = "sk-ant-bundle-0123456789abcdefghijklmnop"
GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]


@pytest.fixture(scope="module")
def clis():
    return install()


@pytest.fixture
def origin(tmp_path):
    """A bare repository with greet.py, as file:// URL."""
    work, bare = tmp_path / "seed", tmp_path / "origin.git"
    work.mkdir()
    (work / "greet.py").write_text('def greet(name):\n    return "Hello " + name\n')
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=work, check=True)
    subprocess.run(["git", "add", "."], cwd=work, check=True)
    subprocess.run([*GIT, "commit", "-qm", "start"], cwd=work, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return f"file://{bare}"


@pytest.fixture
def worker(live_server, settings, tmp_path, monkeypatch):
    """The local launcher of a worker whose environment has no provider key: the bundle's
    secret store (a file per key) is the only place the key is."""
    settings.AGENTRUN_URL = live_server.url
    settings.VAR_DIR = tmp_path / "var"
    settings.AGENTRUN_SECRETS_DIR = tmp_path / "secrets"
    for secret, value in (("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)):
        (tmp_path / "secrets" / secret).mkdir(parents=True)
        (tmp_path / "secrets" / secret / "api-key").write_text(value + "\n")
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MOCK_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    ResourceBundle.objects.create(
        tenant_id=TENANT,
        name="agents",
        is_default=True,
        env=[
            {"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"},
            {"name": "ANTHROPIC_API_KEY", "secret": "anthropic", "key": "api-key"},
        ],
    )
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CODEX_HOME", str(home / ".codex"))
    return LocalLauncher(log_dir=tmp_path / "logs", extra_args=["--idle-seconds", "0.5", "--lease-ms", "10000"])


def run_task(worker, *, backend, origin, session_id, prompt):
    run, _ = services.run_create(
        tenant_id=TENANT,
        project_id=PROJECT,
        backend_profile=backend,
        session_ref={"sessionId": session_id},
        workspace_ref={"kind": "git", "url": origin},
    )
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": prompt})
    assert launching.launch_pending(worker) == 1
    log = worker.log_dir / f"{run.id}.log"
    assert wait_for(lambda: Run.objects.get(pk=run.id).status != "pending", 60), log.read_text()
    assert wait_for(lambda: Run.objects.get(pk=run.id).is_terminal, 180), log.read_text()
    stored = Run.objects.get(pk=run.id)
    assert stored.status == "completed", (stored.failure_kind, stored.failure_message, log.read_text()[-3000:])
    return stored, log


def phase(run, name):
    return [
        e.payload
        for e in RunEvent.objects.filter(run_id=run.id, type="backend_status")
        if e.payload.get("phase") == name
    ]


def assert_no_key_anywhere(run, log, key):
    events = json.dumps([e.payload for e in RunEvent.objects.filter(run_id=run.id)])
    assert key not in events
    stored = Run.objects.filter(pk=run.id).values().get()
    assert key not in json.dumps(stored, default=str)
    assert key not in log.read_text()


PATCH = """apply_patch <<'EOF'
*** Begin Patch
*** Update File: greet.py
@@
 def greet(name):
-    return "Hello " + name
+    return f"Hello, {name}!"
*** End Patch
EOF"""


def test_codex_edits_a_cloned_repository_with_the_bundles_key(clis, worker, origin, monkeypatch, settings):
    model = Responses([{"tool": ("exec_command", {"cmd": PATCH})}, {"text": "Fixed greet."}])
    provider = (
        f'model_providers.mock={{name="mock",base_url="{model.url}/v1",wire_api="responses",'
        'env_key="OPENAI_API_KEY",request_max_retries=0,stream_max_retries=0}'
    )
    monkeypatch.setenv("AGENTRUN_CODEX_BIN", str(clis[0]))
    monkeypatch.setenv("AGENTRUN_CODEX_ARGS", f"-m gpt-5 -c model_provider=mock -c '{provider}'")
    try:
        run, log = run_task(worker, backend="codex", origin=origin, session_id="codex-ws", prompt="fix greet")
    finally:
        model.close()
    assert model.keys and set(model.keys) == {f"Bearer {OPENAI_KEY}"}  # from the bundle, not the environment
    [ready] = phase(run, "workspace-ready")
    assert ready["url"] == origin and ready["commit"] == ready["base"]
    [summary] = phase(run, "workspace-summary")
    assert (summary["filesChanged"], summary["insertions"], summary["deletions"]) == (1, 1, 1)
    workspaces = [e.payload for e in RunEvent.objects.filter(run_id=run.id, type="diff") if e.payload.get("scope")]
    assert '+    return f"Hello, {name}!"' in workspaces[-1]["patch"]
    tree = settings.VAR_DIR / "workspaces" / "codex-ws" / "greet.py"
    assert 'f"Hello, {name}!"' in tree.read_text()
    assert_no_key_anywhere(run, log, OPENAI_KEY)


def test_claude_edits_a_cloned_repository_with_the_bundles_key(clis, worker, origin, monkeypatch, settings):
    tree = settings.VAR_DIR / "workspaces" / "claude-ws"
    path = str(tree / "greet.py")
    model = Anthropic(
        [
            {"tool": ("Read", {"file_path": path})},
            {
                "tool": (
                    "Edit",
                    {"file_path": path, "old_string": '    return "Hello " + name', "new_string": "    return name"},
                )
            },
            {"text": "Fixed greet."},
        ]
    )
    for name, value in claude_environment(model.url, clis[1]).items():
        monkeypatch.setenv(name, value)
    try:
        run, log = run_task(worker, backend="claude-code", origin=origin, session_id="claude-ws", prompt="fix greet")
    finally:
        model.close()
    assert model.keys and set(model.keys) == {ANTHROPIC_KEY}
    [summary] = phase(run, "workspace-summary")
    assert (summary["filesChanged"], summary["insertions"], summary["deletions"]) == (1, 1, 1)
    assert (tree / "greet.py").read_text() == "def greet(name):\n    return name\n"
    assert_no_key_anywhere(run, log, ANTHROPIC_KEY)
