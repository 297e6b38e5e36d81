"""Webhooks: a run or queue task that names a `webhookUrl` gets a signed POST when it ends.

- **Outbox.** The delivery row is written in the transaction that ends the run or task
  (`enqueue`), so a webhook is sent if and only if the end committed.
- **Delivery.** The worker sends what is due (`deliver_due`), several at once, each as a JSON
  POST signed with the tenant's secret: `X-Agentrun-Timestamp: <unix seconds>` and
  `X-Agentrun-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, so a receiver
  can check it came from here and refuse an old one replayed (`verify`). `X-Agentrun-Delivery`
  names the delivery: a receiver that saw it already can drop it (a delivery is at least once).
- **Retries.** Anything but a 2xx (or no answer within the timeout) is tried again after an
  exponential backoff with jitter, up to `AGENTRUN_WEBHOOK_MAX_ATTEMPTS` tries; then it is
  `failed`, and an operator may resend it from admin.
- **Where it may go.** http(s) only, and never to a private, loopback or link-local address
  (checked when the URL is given and again, resolved, before each try) unless
  `AGENTRUN_WEBHOOK_ALLOW_PRIVATE` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from agentrun import tallies
from agentrun.clock import db_now
from agentrun.errors import invalid
from agentrun.ids import new_id
from agentrun.models import DeliveryState, WebhookDelivery, WebhookSecret
from agentrun.wire import iso

logger = logging.getLogger(__name__)

RUN_ENDED = "run.ended"
TASK_ENDED = "queue-task.ended"
SIGNATURE_HEADER = "X-Agentrun-Signature"
TIMESTAMP_HEADER = "X-Agentrun-Timestamp"
DELIVERY_HEADER = "X-Agentrun-Delivery"
MAX_URL_LENGTH = 2048
# A delivery being sent is not due again for this long (a worker that dies mid-send: it is retried).
SENDING_LEASE = timedelta(minutes=2)
ERROR_LIMIT = 500


# --- URLs ---------------------------------------------------------------------------------------


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def validate_url(url: object, *, field: str = "webhookUrl") -> str | None:
    """A webhook URL as given (None for none): http(s), a host, no credentials, at most 2048
    characters, and no private or loopback address written in it (unless allowed)."""
    if url is None or url == "":
        return None
    if not isinstance(url, str):
        raise invalid(f"{field} must be a string", field=field)
    if len(url) > MAX_URL_LENGTH:
        raise invalid(f"{field} is longer than {MAX_URL_LENGTH} characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid(f"{field} is not a URL", field=field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"{field} must be an http or https URL with a host", field=field)
    if parts.username is not None or parts.password is not None:
        raise invalid(f"{field} must not hold credentials", field=field)
    if any(char.isspace() for char in url) or (port is not None and not 0 < port < 65536):
        raise invalid(f"{field} is not a URL", field=field)
    if not settings.AGENTRUN_WEBHOOK_ALLOW_PRIVATE:
        host = parts.hostname
        try:
            literal = _refused_address(host)
        except ValueError:
            literal = host == "localhost" or host.endswith(".localhost")
        if literal:
            raise invalid(f"{field} names a private or loopback address", field=field)
    return url


def refused_destination(url: str) -> str | None:
    """Why `url` may not be called now (its host resolves to a private address), or None."""
    if settings.AGENTRUN_WEBHOOK_ALLOW_PRIVATE:
        return None
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {parts.hostname}: {exc}"
    for info in infos:
        if _refused_address(str(info[4][0])):
            return f"{parts.hostname} resolves to a private or loopback address ({info[4][0]})"
    return None


# --- secrets and signatures --------------------------------------------------------------------


def tenant_secret(tenant_id: str, *, rotate: bool = False) -> str:
    """The tenant's signing secret, made if it has none; `rotate` replaces it (at once: the next
    delivery is signed with the new one)."""
    value = "whsec_" + secrets.token_urlsafe(32)
    if rotate:
        secret, _ = WebhookSecret.objects.update_or_create(
            tenant_id=tenant_id,
            defaults={"secret": value, "rotated_at": timezone.now()},
            create_defaults={"secret": value},
        )
    else:
        secret, _ = WebhookSecret.objects.get_or_create(tenant_id=tenant_id, defaults={"secret": value})
    return secret.secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(
    secret: str, *, body: bytes, timestamp: str, signature: str, tolerance: float = 300, now: float | None = None
) -> bool:
    """What a receiver checks: the signature is this body's at this timestamp, and the timestamp
    is within `tolerance` seconds of now (an older one is a replay)."""
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - stamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, stamp, body), signature.strip())


# --- the outbox ----------------------------------------------------------------------------------


def enqueue(
    *,
    tenant_id: str,
    url: str,
    event_type: str,
    data: dict[str, Any],
    at: datetime,
    run_id: str | None = None,
    task_id: str | None = None,
) -> WebhookDelivery:
    """Write a delivery in the caller's transaction (whose time `at` it carries): it is sent
    once that commits."""
    delivery_id = new_id("whd")
    body = {"id": delivery_id, "type": event_type, "createdAt": iso(at), "data": data}
    return WebhookDelivery.objects.create(
        id=delivery_id,
        tenant_id=tenant_id,
        url=url,
        event_type=event_type,
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        run_id=run_id,
        task_id=task_id,
        next_attempt_at=at,
    )


def resend(*, delivery_ids: list[str]) -> int:
    """Send these again, now, with a full set of tries (admin's action)."""
    return WebhookDelivery.objects.filter(pk__in=delivery_ids).update(
        state=DeliveryState.PENDING, attempts=0, next_attempt_at=Now(), delivered_at=None
    )


def backoff_seconds(attempts: int) -> float:
    """After the `attempts`-th failed try: base * 2^(attempts-1), at most the cap, then half of
    it fixed and half random (so receivers that come back are not hit by every retry at once)."""
    base = float(settings.AGENTRUN_WEBHOOK_BACKOFF_SECONDS)
    delay = min(base * 2 ** (attempts - 1), float(settings.AGENTRUN_WEBHOOK_BACKOFF_MAX_SECONDS))
    return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - spreading retries, not a secret


@dataclass(frozen=True)
class Sent:
    delivery_id: str
    outcome: str  # delivered, retry or failed
    status_code: int | None
    error: str | None


def _claim_due(limit: int) -> list[WebhookDelivery]:
    """The due deliveries, each taken for SENDING_LEASE so no other worker sends it meanwhile."""
    with transaction.atomic():
        due = list(
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .filter(state=DeliveryState.PENDING, next_attempt_at__lte=Now())
            .order_by("next_attempt_at")[:limit]
        )
        if due:
            WebhookDelivery.objects.filter(pk__in=[d.pk for d in due]).update(next_attempt_at=Now() + SENDING_LEASE)
    return due


def _send(client: httpx.Client, delivery: WebhookDelivery, secret: str) -> tuple[int | None, str | None]:
    refused = refused_destination(delivery.url)
    if refused:
        return None, refused
    body = delivery.body.encode()
    stamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "agentrun-webhooks/1",
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret, stamp, body),
        DELIVERY_HEADER: delivery.id,
    }
    try:
        response = client.post(delivery.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"the receiver answered {response.status_code}: {response.text[:200]}"[:ERROR_LIMIT]


def deliver_due(*, limit: int = 50) -> list[Sent]:
    """Send every due delivery (up to `limit`), several at once; record each outcome."""
    due = _claim_due(limit)
    if not due:
        return []
    keys = {tenant: tenant_secret(tenant) for tenant in {d.tenant_id for d in due}}
    timeout = float(settings.AGENTRUN_WEBHOOK_TIMEOUT_SECONDS)
    with (
        httpx.Client(timeout=timeout, follow_redirects=False) as client,
        ThreadPoolExecutor(max_workers=min(8, len(due)), thread_name_prefix="agentrun-webhook") as pool,
    ):
        answers = list(pool.map(lambda d: _send(client, d, keys[d.tenant_id]), due))
    sent = [_record(delivery, status, error) for delivery, (status, error) in zip(due, answers, strict=True)]
    tallies.add(tallies.WEBHOOK_DELIVERIES, [item.outcome for item in sent])
    return sent


def _record(delivery: WebhookDelivery, status: int | None, error: str | None) -> Sent:
    attempts = delivery.attempts + 1
    fields: dict[str, Any] = {"attempts": attempts, "last_status_code": status, "last_error": error}
    if error is None:
        outcome = "delivered"
        fields.update(state=DeliveryState.DELIVERED, delivered_at=Now(), next_attempt_at=None)
    elif attempts >= int(settings.AGENTRUN_WEBHOOK_MAX_ATTEMPTS):
        outcome = "failed"
        fields.update(state=DeliveryState.FAILED, next_attempt_at=None)
        logger.warning("webhook %s to %s failed %d times: %s", delivery.id, delivery.url, attempts, error)
    else:
        outcome = "retry"
        fields["next_attempt_at"] = Now() + timedelta(seconds=backoff_seconds(attempts))
    # Only if nobody changed it meanwhile (an operator's resend starts over).
    WebhookDelivery.objects.filter(pk=delivery.pk, attempts=delivery.attempts, state=DeliveryState.PENDING).update(
        **fields
    )
    return Sent(delivery.id, outcome, status, error)


def next_due_in(default: float) -> float:
    """Seconds until the next delivery is due (at most `default`)."""
    nxt = (
        WebhookDelivery.objects.filter(state=DeliveryState.PENDING)
        .order_by("next_attempt_at")
        .values_list("next_attempt_at", flat=True)
        .first()
    )
    if nxt is None:
        return default
    return max(0.0, min(default, (nxt - db_now()).total_seconds()))
