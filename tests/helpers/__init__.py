"""What the tests share besides fixtures (those are in tests/conftest.py): builders of rows, API
clients, threads and waits, servers on real sockets, and fakes of what agentrun talks to.

Tests import from here (`from tests.helpers import make_run, wait_for`), never from conftest or
from another test module.
"""

from tests.helpers.agent_clis import Anthropic, Responses, ScriptedModel, claude_environment, install
from tests.helpers.api import KeyClient, assert_error, make_key, raw_key
from tests.helpers.data import (
    PROJECT,
    TENANT,
    claim,
    events_of,
    finish_run,
    make_run,
    make_task,
    phases,
    settle_all,
    usurp,
)
from tests.helpers.kube import TOKEN, FakeCluster, FakeKube, schema_errors, write_kubeconfig
from tests.helpers.launchers import RecordingLauncher
from tests.helpers.live_server import free_port, gunicorn, live_database_url, start_runner
from tests.helpers.threads import Threads, in_threads, wait_for

__all__ = [
    "PROJECT",
    "TENANT",
    "TOKEN",
    "Anthropic",
    "FakeCluster",
    "FakeKube",
    "KeyClient",
    "RecordingLauncher",
    "Responses",
    "ScriptedModel",
    "Threads",
    "assert_error",
    "claim",
    "claude_environment",
    "events_of",
    "finish_run",
    "free_port",
    "gunicorn",
    "in_threads",
    "install",
    "live_database_url",
    "make_key",
    "make_run",
    "make_task",
    "phases",
    "raw_key",
    "schema_errors",
    "settle_all",
    "start_runner",
    "usurp",
    "wait_for",
    "write_kubeconfig",
]
