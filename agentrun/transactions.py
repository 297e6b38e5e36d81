"""The transaction every service runs in, retried when PostgreSQL aborts it for a race.

A deadlock (40P01) or a serialization failure (40001) aborts one of two racing transactions
through no fault of its caller, and so does a unique violation (23505) on a row a concurrent
writer inserted after this one looked: a service that reads before it inserts finds the winner's
row when run again, and answers as a replay. The client never sees any of these; a retry is the
whole transaction again, so it is done only where the transaction begins (inside a caller's
transaction the error goes up to the caller's own retry).

The house rule (STYLE.md, "Transactions"): a public service is `@write_transaction(durable=True)`,
so a caller that is already inside a transaction fails loudly instead of holding locks longer. A
write that must run inside another service's transaction, holding the locks that service took, is a
step: `@in_transaction`, which fails loudly when called outside one. When a service is needed both
ways, it is written once as the step, named `<service>_in_transaction`, and
`<service> = durable_service(<service>_in_transaction)` is the public service.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar, overload

from django.db import DatabaseError, connection, transaction

P = ParamSpec("P")
R = TypeVar("R")

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


@overload
def write_transaction(func: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def write_transaction(
    *, durable: bool = False, retry_unique: bool = False
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def write_transaction(
    func: Callable[P, R] | None = None, /, *, durable: bool = False, retry_unique: bool = False
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """`transaction.atomic` for a service, retried (with jittered backoff) when a race aborted
    it and it is the outermost transaction. `retry_unique`: also when it lost a race to insert
    a row, for a service that looks for that row before inserting it."""
    retried = ABORTED | {UNIQUE_VIOLATION} if retry_unique else ABORTED

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        atomic_function = transaction.atomic(durable=durable)(function)

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
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


def in_a_caller_transaction() -> bool:
    """True inside a transaction some code opened (not only the one a test case wraps around
    each test, which Django marks), so a step's check means the same in tests as in production."""
    return any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def in_transaction(function: Callable[P, R]) -> Callable[P, R]:
    """A step of another service's transaction: it relies on the locks that service holds and
    opens no transaction of its own, so calling it outside one is a bug, raised at once."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not in_a_caller_transaction():
            raise RuntimeError(f"{function.__qualname__} must run inside its caller's transaction")
        return function(*args, **kwargs)

    return wrapper


def durable_service(step: Callable[P, R], /) -> Callable[P, R]:
    """The public service of a step named `<service>_in_transaction`: the same function in a
    durable transaction of its own, for a service needed both ways."""
    body: Callable[P, R] = getattr(step, "__wrapped__", step)
    service = write_transaction(durable=True)(body)
    service.__name__ = step.__name__.removesuffix("_in_transaction")
    service.__qualname__ = step.__qualname__.removesuffix("_in_transaction")
    return service
