"""Reads of queue tasks: one task, the list (change feed or priority view), stats, the commander."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import (
    BigIntegerField,
    BooleanField,
    Case,
    Count,
    DateTimeField,
    F,
    Field,
    Max,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)

from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import invalid, not_found
from agentrun.text import is_unstorable
from queues.models import TASK_ACTIVE, QueueReadCursor, QueueTask, TaskState

COMMANDER_ITEMS = 20
PRIORITY_ORDER = ("-priority", "created_at", "id")


@dataclass
class TaskPage:
    tasks: list
    cursor: str | None
    next_page_token: str | None


def task_get(*, task_id: str, scope: Scope) -> QueueTask:
    task = QueueTask.objects.filter(scope.q(), pk=task_id).first()
    if task is None:
        raise not_found("queue task", task_id)
    return task


def _filtered(scope: Scope, queue: str | None, state: str | None) -> QuerySet[QueueTask]:
    if state is not None and state not in TaskState.values:
        raise invalid(f"state must be one of {', '.join(TaskState.values)}", parameter="state")
    tasks = QueueTask.objects.filter(scope.q())
    if queue is not None:
        tasks = tasks.filter(queue=queue)
    if state is not None:
        tasks = tasks.filter(state=state)
    return tasks


def _encode(position: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(raw: str, filters: list) -> dict:
    try:
        position = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if (
            position["f"] != filters
            or not isinstance(position["p"], int)
            or not isinstance(position["i"], str)
            or is_unstorable(position["i"])
        ):
            raise ValueError("token of another listing")
        created = datetime.fromisoformat(position["c"])
        # The tokens this listing writes carry UTC; a forged one without a zone is read as UTC.
        position["c"] = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
        return position
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise invalid(
            "pageToken is not a token of this listing; start again without it", parameter="pageToken"
        ) from None


def task_list(
    *,
    scope: Scope,
    queue: str | None = None,
    state: str | None = None,
    cursor: int | None = None,
    page_token: str | None = None,
    limit: int = 50,
) -> TaskPage:
    """With `cursor`: the change feed, tasks whose version is above it, in version order (A2).
    Without: the priority view (priority, then age, then id) and, as `cursor`, the highest
    matching version. Priority and creation time never change, so keyset pages neither skip nor
    repeat; a task whose state changes may leave or join a state filter between pages."""
    if cursor is not None and page_token is not None:
        raise invalid(
            "give either cursor (the change feed) or pageToken (the priority view), not both", parameter="pageToken"
        )
    tasks = _filtered(scope, queue, state)
    if cursor is not None:
        page = list(tasks.filter(version__gt=cursor).order_by("version")[:limit])
        return TaskPage(page, str(page[-1].version) if page else str(cursor), None)
    filters = [queue, state]
    watermark = tasks.aggregate(top=Max("version"))["top"]
    if page_token is not None:
        position = _decode(page_token, filters)
        tasks = tasks.filter(
            Q(priority__lt=position["p"])
            | Q(priority=position["p"], created_at__gt=position["c"])
            | Q(priority=position["p"], created_at=position["c"], id__gt=position["i"])
        )
    page = list(tasks.order_by(*PRIORITY_ORDER)[: limit + 1])
    token = None
    if len(page) > limit:
        page = page[:limit]
        last = page[-1]
        token = _encode({"f": filters, "p": last.priority, "c": last.created_at.isoformat(), "i": last.id})
    return TaskPage(page, str(watermark) if watermark is not None else None, token)


def task_stats(*, scope: Scope, queue: str | None = None, generated_at: datetime | None = None) -> dict:
    """SPEC §1.7 QueueStats over the key's tasks (one queue's, if given)."""
    tasks = _filtered(scope, queue, None)
    by_state = dict(tasks.values_list("state").annotate(n=Count("id")).order_by())
    by_lane = dict(tasks.values_list("lane").annotate(n=Count("id")).order_by())
    top = tasks.aggregate(top=Max("version"))["top"]
    return {
        "queue": queue,
        "total": sum(by_state.values()),
        "byState": by_state,
        "byLane": by_lane,
        "maxVersion": top or 0,
        "generatedAt": generated_at or db_now(),
    }


def _cursor_column(column: str, reader_id: str | None, output_field: Field) -> Value | Subquery:
    if reader_id is None:
        return Value(None, output_field=output_field)
    return Subquery(QueueReadCursor.objects.filter(task_id=OuterRef("pk"), reader_id=reader_id).values(column)[:1])


def commander(*, scope: Scope, queue: str | None = None, reader_id: str | None = None) -> dict:
    """The commander's snapshot (A12): active tasks first, then unread, then priority, age, id;
    at most 20. With a reader, only active or unread tasks; without one, every task. The stats
    cover every task of the scope (and queue), and share the snapshot's `generatedAt`."""
    generated_at = db_now()
    active = Q(state__in=TASK_ACTIVE)
    unread = ~active & (Q(cursor_version__isnull=True) | Q(cursor_version__lt=F("version")))
    chosen = _filtered(scope, queue, None).annotate(
        cursor_version=_cursor_column("task_version", reader_id, BigIntegerField()),
        cursor_read_at=_cursor_column("read_at", reader_id, DateTimeField()),
    )
    if reader_id is not None:
        chosen = chosen.filter(active | unread)
    chosen = chosen.annotate(
        is_active=Case(When(active, then=Value(True)), default=Value(False), output_field=BooleanField()),
        is_unread=Case(When(unread, then=Value(True)), default=Value(False), output_field=BooleanField()),
    ).order_by("-is_active", "-is_unread", *PRIORITY_ORDER)
    return {
        "queue": queue,
        "readerId": reader_id,
        "stats": task_stats(scope=scope, queue=queue, generated_at=generated_at),
        "items": list(chosen[:COMMANDER_ITEMS]),
        "generatedAt": generated_at,
    }
