"""Production settings, in a fresh interpreter: no database, or a database that is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, django
django.setup()
from django.test import Client
client = Client()
out = {}
for path, headers in [
    ("/api/v1/health", {}), ("/livez", {}), ("/readyz", {}),
    ("/api/v1/runs/run_x", {"HTTP_AUTHORIZATION": "Bearer ar_nothing"}), ("/admin/", {}),
]:
    response = client.get(path, **headers)
    is_json = response["Content-Type"].startswith("application/json")
    out[path] = [response.status_code, response.json() if is_json else None]
print(json.dumps(out))
"""


def probe(env_overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DJANGO_SETTINGS_MODULE="settings.prod", DJANGO_SECRET_KEY="test", **env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_without_database_url_serves_only_503():
    out = probe({})
    status, health = out["/api/v1/health"]
    assert status == 503
    assert health["adapter"] == "postgres"
    assert (health["ready"], health["reachable"], health["migrationReady"]) == (False, False, False)
    assert health["failureKind"] == "infra-failed" and health["credentialValuesPrinted"] is False
    assert health["details"] == {"adapter": "postgres", "databaseUrl": "missing", "memoryFallback": "disabled"}
    assert out["/livez"][0] == 200 and out["/readyz"][0] == 503
    for path in ("/api/v1/runs/run_x", "/admin/"):
        status, body = out[path]
        assert status == 503 and body["error"]["kind"] == "infra-failed"
        assert body["error"]["details"]["databaseUrl"] == "missing"


def test_database_down_is_503_infra_failed_not_500():
    out = probe(
        {
            "DATABASE_URL": "postgresql://agentrun:s3cret-pw@127.0.0.1:1/agentrun?connect_timeout=2",
            "AGENTRUN_DB_POOL_TIMEOUT": "1",
        }
    )
    status, health = out["/api/v1/health"]
    assert status == 503 and health["reachable"] is False and health["failureKind"] == "infra-failed"
    status, body = out["/api/v1/runs/run_x"]
    assert status == 503 and body["error"]["kind"] == "infra-failed"
    # Nothing prints the DSN or its password.
    assert "s3cret-pw" not in json.dumps(out)
    assert out["/livez"][0] == 200 and out["/readyz"][0] == 503
