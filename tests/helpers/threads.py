"""Threads for tests, and waiting on a condition instead of sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection


class Threads:
    """`work(i)` for each i in range(count), in a thread of its own, all released together by a
    barrier so that they race; each closes its database connection when done.

    `join()` waits for them with a deadline and gives their results in order; an exception a
    thread raised is raised there, unless it is one of `catch`, which stands as that thread's
    result (the losers of a race). Started at once, so a test can act while they run.
    """

    def __init__(
        self,
        count: int,
        work: Callable[[int], Any],
        *,
        catch: type[BaseException] | tuple[type[BaseException], ...] = (),
    ):
        self.work, self.catch = work, catch
        self.results: list[Any] = [None] * count
        self.errors: list[BaseException | None] = [None] * count
        self.barrier = threading.Barrier(count)
        self.threads = [
            threading.Thread(target=self._one, args=(index,), name=f"test-{index}", daemon=True)
            for index in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _one(self, index: int) -> None:
        try:
            self.barrier.wait()
            self.results[index] = self.work(index)
        except self.catch as error:
            self.results[index] = error
        except BaseException as error:  # noqa: BLE001 - raised again by join(), in the test's thread
            self.errors[index] = error
        finally:
            connection.close()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float = 240.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = sum(thread.is_alive() for thread in self.threads)
        assert not running, f"{running} of {len(self.threads)} threads still running after {timeout} s"
        for error in self.errors:
            if error is not None:
                raise error
        return self.results


def in_threads(
    count: int, work: Callable[[int], Any], *, catch: type[BaseException] | tuple[type[BaseException], ...] = ()
) -> list[Any]:
    """`Threads(count, work, catch=catch).join()`: race them, then their results."""
    return Threads(count, work, catch=catch).join()


def wait_for(condition: Callable[[], object], timeout: float = 30.0, step: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)  # the poll's interval, not a wait for state
    return False
