"""Production: DATABASE_URL is required. Without it the API answers 503 infra-failed."""

import os

from agentrun.database import POSTGRES_ADAPTER, database_url_from_env, django_database

from .base import *  # noqa: F403

DEBUG = False
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    # Sessions and admin logins need a stable secret; without one every restart logs operators out.
    SECRET_KEY = os.urandom(32).hex()

_url = database_url_from_env()
if _url:
    DATABASES = {"default": django_database(_url, pool=True, adapter=POSTGRES_ADAPTER)}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.dummy"}}
AGENTRUN_DATABASE_MISSING = not _url
