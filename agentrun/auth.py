"""API keys: bearer authentication, roles and the tenant scope every query is filtered by."""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone
from psycopg import sql
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated, PermissionDenied
from rest_framework.permissions import BasePermission

from agentrun import logs
from agentrun.errors import AUTH_REQUIRED, TENANT_POLICY_DENIED, AgentRunError, invalid
from agentrun.models import ApiKey, AuthFailure, Role
from agentrun.sqlnames import column, table

# `Role` (client, runner, operator) is the one enum of key roles. Views' `roles` and the key
# command take it from here; it is defined with the ApiKey model, whose column's choices it is.

KEY_PREFIX = "ar_"


def hash_key(raw_key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def api_key_create(
    *,
    tenant_id: str,
    role: str,
    project_id: str | None = None,
    run_id: str | None = None,
    name: str = "",
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Create a key (that stops working after `expires_in`, if given); returns the record and the
    raw key, which is not stored anywhere."""
    if role not in Role.values:
        raise invalid(f"role must be one of {', '.join(Role.values)}", field="role")
    if not tenant_id:
        raise invalid("tenant is required", field="tenant")
    if run_id and role != Role.RUNNER:
        raise invalid("only runner keys can be scoped to a run", field="run")
    if expires_in is not None and expires_in.total_seconds() <= 0:
        raise invalid("an expiry must be in the future", field="expires_in")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        expires_at=timezone.now() + expires_in if expires_in is not None else None,
        prefix=raw[:10],
        key_hash=hash_key(raw),
        name=name,
        tenant_id=tenant_id,
        project_id=project_id or None,
        role=role,
        run_id=run_id or None,
    )
    return key, raw


def api_key_revoke(*, key_ids: Iterable[int]) -> int:
    """The keys stop working (within the per-process cache time); how many were live."""
    return ApiKey.objects.filter(pk__in=list(key_ids), revoked_at__isnull=True).update(revoked_at=Now())


@dataclass(frozen=True)
class Scope:
    """What a key may see: its tenant, its project if it has one, its run if it is run-scoped.
    `Scope.unrestricted()` is for the worker, admin and management commands."""

    tenant_id: str | None
    project_id: str | None = None
    run_id: str | None = None

    @classmethod
    def unrestricted(cls) -> Scope:
        return cls(tenant_id=None)

    @classmethod
    def of(cls, key: ApiKey) -> Scope:
        return cls(tenant_id=key.tenant_id, project_id=key.project_id, run_id=key.run_id)

    def q(self, *, tenant: str = "tenant_id", project: str = "project_id", run: str | None = None) -> Q:
        q = Q()
        if self.tenant_id is not None:
            q &= Q(**{tenant: self.tenant_id})
        if self.project_id is not None:
            q &= Q(**{project: self.project_id})
        if run is not None and self.run_id is not None:
            q &= Q(**{run: self.run_id})
        return q

    def allows(self, tenant_id: str, project_id: str) -> bool:
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            return False
        return self.project_id is None or project_id == self.project_id

    def fill(self, tenant_id: str | None, project_id: str | None) -> tuple[str, str]:
        """A body's tenantId/projectId: left out, the key's scope fills them; given, they must match."""
        tenant_id = tenant_id if tenant_id not in (None, "") else self.tenant_id
        project_id = project_id if project_id not in (None, "") else self.project_id
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            raise AgentRunError(
                TENANT_POLICY_DENIED,
                "tenantId is outside this key's tenant",
                status=403,
                details={"valuesPrinted": False},
            )
        if self.project_id is not None and project_id != self.project_id:
            raise AgentRunError(
                TENANT_POLICY_DENIED,
                "projectId is outside this key's project",
                status=403,
                details={"valuesPrinted": False},
            )
        if not isinstance(tenant_id, str) or not tenant_id:
            raise invalid("tenantId is required", field="tenantId")
        if not isinstance(project_id, str) or not project_id:
            raise invalid("projectId is required", field="projectId")
        return tenant_id, project_id


class _KeyCache:
    """Recently seen keys, per process, for `AGENTRUN_AUTH_CACHE_SECONDS`: the key lookup is a
    query and a model on every request otherwise. A revoked key stops working within that time.
    Only valid keys are kept, so unknown keys cannot grow it past its bound."""

    MAX_ENTRIES = 10_000

    def __init__(self):
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> ApiKey | None:
        """The live key of this hash: not revoked, not expired (an expiry holds to the second,
        cached or not)."""
        ttl = settings.AGENTRUN_AUTH_CACHE_SECONDS
        key = None
        if ttl > 0:
            entry = self._entries.get(key_hash)
            if entry is not None and entry[0] > time.monotonic():
                key = entry[1]
        if key is None:
            key = ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()
            if key is not None and ttl > 0:
                with self._lock:
                    if len(self._entries) >= self.MAX_ENTRIES:
                        self._entries.clear()
                    self._entries[key_hash] = (time.monotonic() + ttl, key)
        if key is None or (key.expires_at is not None and key.expires_at <= timezone.now()):
            return None
        _note_use(key)
        return key

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


key_cache = _KeyCache()

# When this process last wrote each key's last_used_at (key id -> monotonic time).
_last_noted: dict[int, float] = {}
USE_NOTE_SECONDS = 60.0


def _note_use(key: ApiKey) -> None:
    """last_used_at, written at most once a minute per key and process (and not at all when
    another process wrote it within the minute): a request does not pay a write for it."""
    now = time.monotonic()
    if now - _last_noted.get(key.pk, -USE_NOTE_SECONDS) < USE_NOTE_SECONDS:
        return
    if len(_last_noted) >= _KeyCache.MAX_ENTRIES:
        _last_noted.clear()
    _last_noted[key.pk] = now
    if key.last_used_at is not None and timezone.now() - key.last_used_at < timedelta(seconds=USE_NOTE_SECONDS):
        return  # as loaded, another process noted it within the minute
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=Now() - timedelta(seconds=USE_NOTE_SECONDS))
    ApiKey.objects.filter(stale, pk=key.pk).update(last_used_at=Now())


# --- failed lookups, limited per client address -------------------------------------------------

# Raw: one upsert that counts a failure in the address's current window (or opens a new one) and
# says how many it holds and how long the window has left; the ORM has no INSERT … ON CONFLICT
# DO UPDATE with expressions.
_FAIL = sql.SQL(
    "INSERT INTO {table} ({address}, {started}, {failures}) VALUES (%(address)s, now(), 1) "
    "ON CONFLICT ({address}) DO UPDATE SET "
    "{failures} = CASE WHEN {table}.{started} <= now() - make_interval(secs => %(window)s) "
    "THEN 1 ELSE {table}.{failures} + 1 END, "
    "{started} = CASE WHEN {table}.{started} <= now() - make_interval(secs => %(window)s) "
    "THEN now() ELSE {table}.{started} END "
    "RETURNING {failures}, EXTRACT(EPOCH FROM {started} + make_interval(secs => %(window)s) - now())"
).format(
    table=table(AuthFailure),
    address=column(AuthFailure, "address"),
    started=column(AuthFailure, "window_started_at"),
    failures=column(AuthFailure, "failures"),
)


class _FailureLimiter:
    """More than AGENTRUN_AUTH_FAILURE_LIMIT failed key lookups from one address within
    AGENTRUN_AUTH_FAILURE_WINDOW_SECONDS, and that address is refused (429) until its window
    ends. Failures are counted in the database (every process and replica together); each
    process remembers the addresses it refused, so a refused address costs no query."""

    MAX_BLOCKED = 10_000

    def __init__(self) -> None:
        self._blocked: dict[str, float] = {}  # address -> monotonic time its window ends

    def retry_after(self, address: str) -> float:
        until = self._blocked.get(address)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            self._blocked.pop(address, None)
            return 0.0
        return left

    def fail(self, address: str) -> float:
        """Count a failure; how long the address is refused from now (0: not over the limit)."""
        window = float(settings.AGENTRUN_AUTH_FAILURE_WINDOW_SECONDS)
        with connection.cursor() as cursor:
            cursor.execute(_FAIL, {"address": address[:64], "window": window})
            failures, left = cursor.fetchone()
        if failures <= settings.AGENTRUN_AUTH_FAILURE_LIMIT:
            return 0.0
        left = max(float(left), 1.0)
        if len(self._blocked) >= self.MAX_BLOCKED:
            self._blocked.clear()
        self._blocked[address] = time.monotonic() + left
        return left

    def clear(self) -> None:
        self._blocked.clear()


failure_limiter = _FailureLimiter()


def client_address(request: Any) -> str:
    """The client's address: REMOTE_ADDR, or behind AGENTRUN_TRUSTED_PROXIES proxies (an ingress,
    a load balancer) the address the outermost of them saw, from X-Forwarded-For."""
    proxies = int(settings.AGENTRUN_TRUSTED_PROXIES)
    remote = request.META.get("REMOTE_ADDR") or "unknown"
    if proxies <= 0:
        return remote
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    return hops[-proxies] if len(hops) >= proxies else (hops[0] if hops else remote)


def too_many_failures(seconds: float) -> AgentRunError:
    wait = max(1, math.ceil(seconds))
    return AgentRunError(
        AUTH_REQUIRED,
        f"too many failed API key lookups from this address; retry in {wait} s",
        status=429,
        details={"retryAfterSeconds": wait},
    )


class KeyPrincipal:
    """request.user for an API key: authenticated, never staff."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, key: ApiKey):
        self.key = key
        self.pk = key.pk

    def __str__(self) -> str:
        return str(self.key)


class ApiKeyAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts:
            return None
        address = client_address(request)
        refused = failure_limiter.retry_after(address)
        if refused:
            raise too_many_failures(refused)
        if parts[0].lower() != self.keyword or len(parts) != 2:
            self._failed(address)
            raise AuthenticationFailed("use Authorization: Bearer <api key>")
        try:
            raw = parts[1].decode("ascii")
        except UnicodeDecodeError:
            self._failed(address)
            raise AuthenticationFailed("invalid API key") from None
        # The key is found by its SHA-256 in a unique index, never compared as text: how long a
        # lookup takes says nothing of how much of a key was right.
        key = key_cache.get(hash_key(raw))
        if key is None:
            self._failed(address)
            raise AuthenticationFailed("invalid API key")
        request.scope = Scope.of(key)
        logs.bind(tenant_id=key.tenant_id, project_id=key.project_id, key_id=key.pk)
        return KeyPrincipal(key), key

    @staticmethod
    def _failed(address: str) -> None:
        refused = failure_limiter.fail(address)
        if refused:
            raise too_many_failures(refused)

    def authenticate_header(self, request):
        return 'Bearer realm="agentrun"'


class RolePermission(BasePermission):
    """Views declare `roles`: action name (or `action:METHOD`) → the roles allowed.
    Operators may do everything in their tenant. A view without `roles` is public."""

    def has_permission(self, request, view):
        roles = getattr(view, "roles", None)
        if roles is None:
            return True
        if getattr(view, request.method.lower(), None) is None:
            return True  # no such route for this method: DRF answers 405
        key = request.auth
        if not isinstance(key, ApiKey):
            raise NotAuthenticated("an API key is required: Authorization: Bearer <api key>")
        if key.role == Role.OPERATOR:
            return True
        action = getattr(view, "action", None) or request.method.lower()
        allowed = roles.get(f"{action}:{request.method}", roles.get(action, ()))
        if key.role not in allowed:
            raise PermissionDenied(f"a {key.role} key may not call {action}")
        return True
