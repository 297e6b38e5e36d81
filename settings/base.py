"""Settings shared by every environment. Values come from the environment."""

import contextlib
import os
from pathlib import Path

from agentrun.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("AGENTRUN_VAR_DIR", BASE_DIR / "var"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "agentrun-dev-only-secret-key-change-me")
DEBUG = False
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "*").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "agentrun",
    "sessions.apps.AgentSessionsConfig",
    "runs",
    "queues",
]

MIDDLEWARE = [
    "agentrun.metrics.MetricsMiddleware",
    "agentrun.middleware.RequestContextMiddleware",
    "agentrun.middleware.ApiErrorEnvelopeMiddleware",
    "agentrun.middleware.DatabaseRequiredMiddleware",
    "agentrun.middleware.BodySizeLimitMiddleware",
    "agentrun.middleware.UnstorableInputMiddleware",
    "agentrun.middleware.RawPathMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "agentrun.middleware.SiteOnlySessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "agentrun.middleware.SiteOnlyCsrfViewMiddleware",
    "agentrun.middleware.SiteOnlyAuthenticationMiddleware",
    "agentrun.middleware.SiteOnlyMessageMiddleware",
    "agentrun.middleware.SiteOnlyXFrameOptionsMiddleware",
]

ROOT_URLCONF = "settings.urls"
WSGI_APPLICATION = "agentrun.wsgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Static files (admin, API docs) are served by the app itself, from the finders when no
# collectstatic has run (development, tests) and from STATIC_ROOT once it has (the image).
WHITENOISE_USE_FINDERS = True
# A read-only image: collectstatic made it at build time, or the finders serve.
with contextlib.suppress(OSError):
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# A body over 1 MiB is refused with 413 before it is parsed.
AGENTRUN_MAX_BODY_BYTES = 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = AGENTRUN_MAX_BODY_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["agentrun.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["agentrun.auth.RolePermission"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["agentrun.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "agentrun.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "agentrun API",
    "DESCRIPTION": "Control plane for AI coding-agent runs.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # The docs page works offline: Swagger UI is served from this server, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["agentrun.openapi.canonical_paths"],
    # The error envelope and the statuses every route answers, path id limits and the probes.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "agentrun.openapi.document_errors"],
    "ENUM_NAME_OVERRIDES": {
        "TaskStateEnum": "queues.models.TaskState.values",
        "CommandStateEnum": "runs.models.CommandState.values",
        "SessionListStateEnum": "sessions.selectors.STATES",
        "EventTypeEnum": "agentrun.vocabulary.EVENT_TYPES",
        "CommandTypeEnum": "agentrun.vocabulary.COMMAND_TYPES",
        "FailureKindEnum": "agentrun.vocabulary.FAILURE_KINDS",
        "BackendProfileEnum": "agentrun.backends.PROFILES",
    },
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Logs (agentrun.logs): JSON lines on stderr, or AGENTRUN_LOG_FORMAT=console for a person;
# AGENTRUN_LOG_LEVEL (INFO).
LOGGING = logging_config()

# /metrics wants this bearer token when it is set; unset, /metrics is open (guard it with a network policy).
AGENTRUN_METRICS_TOKEN = os.environ.get("AGENTRUN_METRICS_TOKEN", "")
# Long-polls wait at most this long, whatever the client asks.
AGENTRUN_MAX_WAIT_SECONDS = 30.0
# How long a process trusts a key it has looked up (a revoked key works at most this long).
AGENTRUN_AUTH_CACHE_SECONDS = float(os.environ.get("AGENTRUN_AUTH_CACHE_SECONDS", "5"))
# More than this many failed key lookups from one address within the window, and the address
# gets 429 until the window ends. Behind proxies, AGENTRUN_TRUSTED_PROXIES says how many of
# X-Forwarded-For's last hops are theirs (0: the address is the connection's).
AGENTRUN_AUTH_FAILURE_LIMIT = int(os.environ.get("AGENTRUN_AUTH_FAILURE_LIMIT", "20"))
AGENTRUN_AUTH_FAILURE_WINDOW_SECONDS = float(os.environ.get("AGENTRUN_AUTH_FAILURE_WINDOW_SECONDS", "60"))
AGENTRUN_TRUSTED_PROXIES = int(os.environ.get("AGENTRUN_TRUSTED_PROXIES", "0"))
# Webhooks (agentrun.webhooks): tries per delivery, the backoff after the first failed try (it
# doubles, up to the cap, with jitter), each try's timeout, and whether a URL may name a
# private or loopback address (a receiver inside the cluster, development).
AGENTRUN_WEBHOOK_MAX_ATTEMPTS = int(os.environ.get("AGENTRUN_WEBHOOK_MAX_ATTEMPTS", "8"))
AGENTRUN_WEBHOOK_BACKOFF_SECONDS = float(os.environ.get("AGENTRUN_WEBHOOK_BACKOFF_SECONDS", "10"))
AGENTRUN_WEBHOOK_BACKOFF_MAX_SECONDS = float(os.environ.get("AGENTRUN_WEBHOOK_BACKOFF_MAX_SECONDS", "3600"))
AGENTRUN_WEBHOOK_TIMEOUT_SECONDS = float(os.environ.get("AGENTRUN_WEBHOOK_TIMEOUT_SECONDS", "10"))
AGENTRUN_WEBHOOK_ALLOW_PRIVATE = os.environ.get("AGENTRUN_WEBHOOK_ALLOW_PRIVATE", "").lower() in ("1", "true", "yes")
# Retention (queues.retention): ended runs, finished tasks and sent webhooks older than this go
# (30d, 12h, 2w; empty or 0 keeps everything), checked every AGENTRUN_PRUNE_INTERVAL_SECONDS by
# the worker, which also makes the event table's weekly partitions ahead.
AGENTRUN_RETENTION = os.environ.get("AGENTRUN_RETENTION", "30d").strip()
if AGENTRUN_RETENTION.lower() in ("0", "off", "none", "never"):
    AGENTRUN_RETENTION = ""
AGENTRUN_PRUNE_INTERVAL_SECONDS = float(os.environ.get("AGENTRUN_PRUNE_INTERVAL_SECONDS", "3600"))
# The manager URL handed to runners.
AGENTRUN_URL = os.environ.get("AGENTRUN_URL", "http://127.0.0.1:8000")
# Kubernetes: the namespace of runner Jobs and session PVCs (when a session names none).
AGENTRUN_NAMESPACE = os.environ.get("AGENTRUN_NAMESPACE", "agentrun")
# gc_sessions: how many expired sessions one pass collects by default, and at most.
AGENTRUN_GC_DEFAULT_LIMIT = 50
AGENTRUN_GC_MAX_LIMIT = 500
# worker: seconds between storage collection passes.
# The worker's wiring (like ROOT_URLCONF, a module at the top of the house): manage.py worker runs it.
AGENTRUN_WORKER = "settings.worker"
AGENTRUN_GC_INTERVAL_SECONDS = float(os.environ.get("AGENTRUN_GC_INTERVAL_SECONDS", "300"))
# The reaper: a lapsed lease is left this long to its runner before the run fails runner-lost.
AGENTRUN_REAP_GRACE_SECONDS = float(os.environ.get("AGENTRUN_REAP_GRACE_SECONDS", "30"))
AGENTRUN_REAP_INTERVAL_SECONDS = float(os.environ.get("AGENTRUN_REAP_INTERVAL_SECONDS", "5"))
# The kubernetes launcher: the runner image, its service account, and session volumes.
AGENTRUN_RUNNER_IMAGE = os.environ.get("AGENTRUN_RUNNER_IMAGE", "")
AGENTRUN_RUNNER_SERVICE_ACCOUNT = os.environ.get("AGENTRUN_RUNNER_SERVICE_ACCOUNT", "agentrun-runner")
AGENTRUN_RUNNER_CPU = os.environ.get("AGENTRUN_RUNNER_CPU", "500m")
AGENTRUN_RUNNER_MEMORY = os.environ.get("AGENTRUN_RUNNER_MEMORY", "1Gi")
# A runner Job is ended by Kubernetes this long after its run's executionPolicy.timeoutSeconds.
AGENTRUN_RUNNER_DEADLINE_GRACE_SECONDS = int(os.environ.get("AGENTRUN_RUNNER_DEADLINE_GRACE_SECONDS", "300"))
# The reconciler fails a run whose runner pod stayed unschedulable this long (infra-failed).
AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS = float(os.environ.get("AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS", "300"))
AGENTRUN_SESSION_PVC_SIZE = os.environ.get("AGENTRUN_SESSION_PVC_SIZE", "5Gi")
AGENTRUN_SESSION_STORAGE_CLASS = os.environ.get("AGENTRUN_SESSION_STORAGE_CLASS") or None
AGENTRUN_RECONCILE_INTERVAL_SECONDS = float(os.environ.get("AGENTRUN_RECONCILE_INTERVAL_SECONDS", "30"))
# Who starts runners for pending runs: local (a subprocess per run), kubernetes (a Job per run) or none.
AGENTRUN_LAUNCHER = os.environ.get("AGENTRUN_LAUNCHER", "none")
# Whether a git workspaceRef may be a file:// URL: a path on the runner's own machine, which with
# the local launcher is the worker's (another session's workspace too). Development and tests
# allow it; a deployment enables it only on purpose.
AGENTRUN_GIT_FILE_URLS = os.environ.get("AGENTRUN_GIT_FILE_URLS", "").lower() in ("1", "true", "yes")
# The local launcher's secret store, laid out as Kubernetes mounts a Secret: the value of key K
# of secret S is the file <dir>/S/K (a resource bundle's references are read from it).
AGENTRUN_SECRETS_DIR = Path(os.environ.get("AGENTRUN_SECRETS_DIR", VAR_DIR / "secrets"))
# SSE streams: the reconnect delay suggested to clients, the comment heartbeat that keeps proxies
# open, and how long a client may take nothing the server has for it before it is closed.
AGENTRUN_STREAM_RETRY_MS = int(os.environ.get("AGENTRUN_STREAM_RETRY_MS", "2000"))
AGENTRUN_STREAM_HEARTBEAT_SECONDS = float(os.environ.get("AGENTRUN_STREAM_HEARTBEAT_SECONDS", "15"))
AGENTRUN_STREAM_STALL_SECONDS = float(os.environ.get("AGENTRUN_STREAM_STALL_SECONDS", "30"))
# A stream ends (cleanly) after this long and its client reconnects: connections move to new workers.
AGENTRUN_STREAM_MAX_SECONDS = float(os.environ.get("AGENTRUN_STREAM_MAX_SECONDS", "3600"))
# Events per look of a stream (a stream holds at most one look's frames).
AGENTRUN_STREAM_PAGE = int(os.environ.get("AGENTRUN_STREAM_PAGE", "100"))
