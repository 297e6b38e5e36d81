"""The transaction every service runs in, retried when PostgreSQL aborts it for a race.

A deadlock (40P01) or a serialization failure (40001) aborts one of two racing transactions
through no fault of its caller, and so does a unique violation (23505) on a row a concurrent
writer inserted after this one looked: a service that reads before it inserts finds the winner's
row when run again, and answers as a replay. The client never sees any of these; a retry is the
whole transaction again, so it is done only where the transaction begins (inside a caller's
transaction the error goes up to the caller's own retry).
"""

from __future__ import annotations

import functools
import logging
import random
import time

from django.db import DatabaseError, connection, transaction

logger = logging.getLogger(__name__)

DEADLOCK = "40P01"
SERIALIZATION_FAILURE = "40001"
UNIQUE_VIOLATION = "23505"
ABORTED = frozenset({DEADLOCK, SERIALIZATION_FAILURE})
ATTEMPTS = 8


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error Django wrapped, or None."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return getattr(cause, "sqlstate", None)


def is_aborted_by_race(exc: BaseException) -> bool:
    """A deadlock or serialization failure: retrying the transaction can succeed."""
    return isinstance(exc, DatabaseError) and sqlstate(exc) in ABORTED


def write_transaction(func=None, *, durable: bool = False, retry_unique: bool = False):
    """`transaction.atomic` for a service, retried (with jittered backoff) when a race aborted
    it and it is the outermost transaction. `retry_unique`: also when it lost a race to insert
    a row, for a service that looks for that row before inserting it."""
    retried = ABORTED | {UNIQUE_VIOLATION} if retry_unique else ABORTED

    def decorate(function):
        atomic_function = transaction.atomic(durable=durable)(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if connection.in_atomic_block:
                return atomic_function(*args, **kwargs)
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    return atomic_function(*args, **kwargs)
                except DatabaseError as exc:
                    if sqlstate(exc) not in retried or attempt == ATTEMPTS:
                        raise
                    logger.info(
                        "%s: %s (sqlstate %s), attempt %d, retrying",
                        function.__qualname__,
                        type(exc).__name__,
                        sqlstate(exc),
                        attempt,
                    )
                    time.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 - jitter, not a secret
            raise AssertionError("unreachable")

        return wrapper

    return decorate(func) if func is not None else decorate
