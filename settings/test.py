"""Tests: DATABASE_URL if set, else an embedded PostgreSQL under var/ (stopped when pytest exits)."""

import os

from agentrun.database import (
    EMBEDDED_ADAPTER,
    POSTGRES_ADAPTER,
    database_url_from_env,
    django_database,
    start_embedded,
)

from .base import *  # noqa: F403
from .base import VAR_DIR

# A workspaceRef may clone a repository on this machine (file://).
AGENTRUN_GIT_FILE_URLS = True
# A webhook receiver on this machine (127.0.0.1) is allowed.
AGENTRUN_WEBHOOK_ALLOW_PRIVATE = True

_url = database_url_from_env()
_adapter = os.environ.get("AGENTRUN_DATABASE_ADAPTER") or (POSTGRES_ADAPTER if _url else EMBEDDED_ADAPTER)
DATABASES = {"default": django_database(_url or start_embedded(VAR_DIR), pool=False, adapter=_adapter)}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Scanning every static file on each test client's start costs ~80 ms; the docs test turns it on.
WHITENOISE_USE_FINDERS = False
# Tests revoke keys and expect the next request to fail; the cache has its own test.
AGENTRUN_AUTH_CACHE_SECONDS = 0
# Streams served in the test's thread (Django's test client, schemathesis) end soon.
AGENTRUN_STREAM_MAX_SECONDS = 0.3
# The suite sends many bad keys from one address; the limiter's own tests lower this.
AGENTRUN_AUTH_FAILURE_LIMIT = 1_000_000
