"""The API's records as the runner and the CLI read them (API.md; the server's output serializers
are the schema). Only the records the runner acts on are spelled out; the rest stay JSON objects.

`JsonObject` is the JSON boundary: an object decoded from the wire, or about to be encoded, whose
values are whatever JSON holds (an agent's lines, event payloads, request bodies).
"""

from __future__ import annotations

from typing import Any, Generic, TypedDict, TypeVar

JsonObject = dict[str, Any]

Item = TypeVar("Item")


class Run(TypedDict):
    id: str
    tenantId: str
    projectId: str
    backendProfile: str
    sessionRef: JsonObject | None  # {sessionId, threadId?, ...}
    resourceBundleRef: JsonObject | None
    providerId: str | None
    workspaceRef: JsonObject | None
    executionPolicy: JsonObject | None
    metadata: JsonObject | None
    idempotencyKey: str | None
    status: str  # pending, claimed, completed, failed, cancelled, ...
    terminalStatus: str | None
    failureKind: str | None
    failureMessage: str | None
    claimedBy: str | None
    leaseExpiresAt: str | None
    leaseEpoch: int
    createdAt: str
    updatedAt: str


class Command(TypedDict):
    id: str
    runId: str
    seq: int
    type: str  # turn, steer
    payload: JsonObject
    idempotencyKey: str | None
    payloadHash: str
    state: str  # pending, acknowledged, completed, failed, cancelled, ...
    acknowledgedAt: str | None
    terminalStatus: str | None
    failureKind: str | None
    failureMessage: str | None
    threadId: str | None
    turnId: str | None
    createdAt: str
    updatedAt: str


class Event(TypedDict):
    id: str
    runId: str
    seq: int
    type: str
    payload: JsonObject
    createdAt: str


class Page(TypedDict, Generic[Item]):
    """A run's events or commands after a sequence number."""

    items: list[Item]
    count: int
    cursor: str  # the last item's seq, else the `afterSeq` given


class Listing(TypedDict):
    """A sorted view: sessions (the inbox) or queue tasks."""

    items: list[JsonObject]
    count: int
    cursor: str | None
    nextPageToken: str | None
