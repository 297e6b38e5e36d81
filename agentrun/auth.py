"""API keys: bearer authentication, roles and the tenant scope every query is filtered by."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Q
from django.db.models.functions import Now
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated, PermissionDenied
from rest_framework.permissions import BasePermission

from agentrun.errors import TENANT_POLICY_DENIED, AgentRunError, invalid
from agentrun.models import ApiKey, Role

# `Role` (client, runner, operator) is the one enum of key roles. Views' `roles` and the key
# command take it from here; it is defined with the ApiKey model, whose column's choices it is.

KEY_PREFIX = "ar_"


def hash_key(raw_key: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def api_key_create(
    *, tenant_id: str, role: str, project_id: str | None = None, run_id: str | None = None, name: str = ""
) -> tuple[ApiKey, str]:
    """Create a key; returns the record and the raw key, which is not stored anywhere."""
    if role not in Role.values:
        raise invalid(f"role must be one of {', '.join(Role.values)}", field="role")
    if not tenant_id:
        raise invalid("tenant is required", field="tenant")
    if run_id and role != Role.RUNNER:
        raise invalid("only runner keys can be scoped to a run", field="run")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
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
        ttl = settings.AGENTRUN_AUTH_CACHE_SECONDS
        if ttl > 0:
            entry = self._entries.get(key_hash)
            if entry is not None and entry[0] > time.monotonic():
                return entry[1]
        key = ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).first()
        if key is not None and ttl > 0:
            with self._lock:
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key_hash] = (time.monotonic() + ttl, key)
        return key

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


key_cache = _KeyCache()


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
        if parts[0].lower() != self.keyword or len(parts) != 2:
            raise AuthenticationFailed("use Authorization: Bearer <api key>")
        try:
            raw = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("invalid API key") from None
        key = key_cache.get(hash_key(raw))
        if key is None:
            raise AuthenticationFailed("invalid API key")
        request.scope = Scope.of(key)
        return KeyPrincipal(key), key

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
