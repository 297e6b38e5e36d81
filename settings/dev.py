"""Development: DATABASE_URL if set, else an embedded PostgreSQL under var/."""

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

DEBUG = True

_url = database_url_from_env()
_adapter = os.environ.get("AGENTRUN_DATABASE_ADAPTER") or (POSTGRES_ADAPTER if _url else EMBEDDED_ADAPTER)
DATABASES = {"default": django_database(_url or start_embedded(VAR_DIR), pool=True, adapter=_adapter)}
