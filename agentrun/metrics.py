"""Prometheus metrics (prometheus-client): the process's own instruments, the middleware that
counts requests, and how /metrics renders them.

Under gunicorn every worker process writes its figures to files in `PROMETHEUS_MULTIPROC_DIR`
(gunicorn.conf.py makes a fresh one at start and forgets a worker that exits), and /metrics,
answered by any one of them, sums every process's. Without it (tests, `runserver`) the figures
are this process's. What lives in the database (runs by status, queue depth, the worker's
tallies) is read at each scrape by a collector the caller passes (queues.metrics), so every
process answers the same.
"""

from __future__ import annotations

import functools
import hmac
import os
import re
import time
from collections.abc import Callable, Iterable

from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from agentrun.errors import AUTH_REQUIRED, SCHEMA_INVALID, AgentRunError, json_error

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REQUESTS = Counter(
    "agentrun_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "agentrun_http_request_duration_seconds",
    "Time to the answer's head (for a stream or a long-poll, until it starts waiting), by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
EVENTS_APPENDED = Counter("agentrun_events_appended", "Run events appended (committed).")
# Open now: summed over the live processes (a dead worker's count goes with it).
STREAMS_OPEN = Gauge("agentrun_streams_open", "SSE streams open.", multiprocess_mode="livesum")
WAITERS_OPEN = Gauge("agentrun_long_polls_waiting", "wait= long-polls waiting.", multiprocess_mode="livesum")
POOL = Gauge(
    "agentrun_db_pool_connections",
    "The database connection pool: its size, connections idle in it, and requests waiting for one.",
    ["state"],
    multiprocess_mode="livesum",
)

UNMATCHED = "unmatched"
_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")


@functools.lru_cache(maxsize=512)
def route_template(route: str) -> str:
    """`api/v1/^runs/(?P<pk>[^/.]+)/claim/?$` -> `/api/v1/runs/{pk}/claim`: a label that stays
    the same for every id."""
    text = _GROUP.sub(lambda match: "{" + match.group(1) + "}", route)
    text = text.replace("^", "").replace("$", "").replace("/?", "").replace("\\.", ".")
    text = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", text)  # path converters: <int:pk>
    return "/" + text.lstrip("/")


class MetricsMiddleware:
    """Counts every answer by route template, method and status and times it; keeps the
    database pool gauges (at most once a second)."""

    POOL_EVERY = 1.0

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self._pool_at = 0.0

    def __call__(self, request: HttpRequest) -> HttpResponse:
        began = time.perf_counter()
        response = self.get_response(request)
        elapsed = time.perf_counter() - began
        match = getattr(request, "resolver_match", None)
        route = route_template(match.route) if match is not None and match.route else UNMATCHED
        method = request.method if request.method in _METHODS else "other"
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        LATENCY.labels(route, method).observe(elapsed)
        now = time.monotonic()
        if now - self._pool_at >= self.POOL_EVERY:
            self._pool_at = now
            record_pool()
        return response


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def record_pool() -> None:
    """The default database's pool figures (psycopg_pool), when it has a pool."""
    pool = getattr(connections["default"], "pool", None) if "default" in connections else None
    if pool is None:
        return
    stats = pool.get_stats()
    POOL.labels("size").set(stats.get("pool_size", 0))
    POOL.labels("idle").set(stats.get("pool_available", 0))
    POOL.labels("waiting").set(stats.get("requests_waiting", 0))


def authorized(request: HttpRequest) -> bool:
    """With AGENTRUN_METRICS_TOKEN set, /metrics wants it as a bearer token (compared in constant time)."""
    token = settings.AGENTRUN_METRICS_TOKEN
    if not token:
        return True
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def render(collectors: Iterable[Collector] = ()) -> bytes:
    """The exposition text: every process's instruments (or this one's) and `collectors`."""
    extra = CollectorRegistry()  # not auto_describe: that would collect (query) once more to register
    for collector in collectors:
        extra.register(collector)
    if MULTIPROCESS:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        own = generate_latest(registry)
    else:
        own = generate_latest(REGISTRY)
    return own + generate_latest(extra)


def metrics_response(request: HttpRequest, collectors: Iterable[Collector] = ()) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        response = json_error(AgentRunError(SCHEMA_INVALID, "/metrics answers GET", status=405))
        response["Allow"] = "GET, HEAD"
        return response
    if not authorized(request):
        response = json_error(AgentRunError(AUTH_REQUIRED, "/metrics wants AGENTRUN_METRICS_TOKEN", status=401))
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(render(collectors), content_type=CONTENT_TYPE_LATEST)
