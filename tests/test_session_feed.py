"""The change feed never skips: a follower sees every committed change while writers race.

Each session is written exactly once while the follower runs, so "seen" is exact: the follower
must observe each (session, version) a writer committed. A version taken from a plain sequence
fails this (a writer that took a lower version but commits later is passed over); the one-row
counter, held until commit, makes commit order version order.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, transaction

from agentrun import counters
from agentrun.auth import Scope
from sessions import selectors, services
from sessions.models import Session
from tests.helpers import PROJECT, TENANT

pytestmark = pytest.mark.django_db(transaction=True)
SCOPE = Scope(tenant_id=TENANT, project_id=PROJECT)
WRITERS, WRITES = 6, 8


def slow_bump(session_id: str, rng: random.Random) -> int:
    """A write shaped like every session service (row lock, next version, save) that dawdles
    before committing, so commits would come out of version order if they could."""
    with transaction.atomic():
        Session.objects.select_for_update().get(pk=session_id)
        version = counters.next_version(counters.SESSIONS)
        time.sleep(rng.uniform(0, 0.004))  # the dawdle before commit is the race under test
        Session.objects.filter(pk=session_id).update(version=version, metadata={"slow": True})
    return version


def write(writer: int, index: int, rng: random.Random) -> tuple[str, int]:
    session_id = f"w{writer}-{index}"
    kind = (writer + index) % 3
    if kind == 0:
        session, _ = services.session_upsert(
            session_id=session_id, tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", metadata={"n": index}
        )
        return session_id, session.version
    if kind == 1:
        session = services.session_storage_refresh(session_id=session_id, storage_kind="pvc", pvc_name=session_id)
        return session_id, session.version
    return session_id, slow_bump(session_id, rng)


@pytest.mark.parametrize("round_number", range(20))
def test_a_follower_sees_every_committed_change(round_number):
    for writer in range(WRITERS):
        for index in range(WRITES):
            if (writer + index) % 3:  # refreshed or bumped: the session exists beforehand
                services.session_upsert(
                    session_id=f"w{writer}-{index}", tenant_id=TENANT, project_id=PROJECT, backend_profile="echo"
                )
    start = max(Session.objects.values_list("version", flat=True))
    observed: set[tuple[str, int]] = set()
    done = threading.Event()

    def follow():
        cursor = start
        try:
            while True:
                finished = done.is_set()  # read before the page: a last page after the writers
                page = selectors.session_list(scope=SCOPE, state="all", cursor=cursor, limit=7)
                observed.update((s.session_id, s.version) for s in page.sessions)
                assert int(page.cursor) >= cursor
                cursor = int(page.cursor)
                if finished and not page.sessions:
                    return
        finally:
            connection.close()

    def writer_thread(writer):
        local = random.Random(round_number * 100 + writer)
        try:
            results = []
            for index in range(WRITES):
                results.append(write(writer, index, local))
                time.sleep(local.uniform(0, 0.002))  # pacing: writes interleave with the follower
            return results
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=WRITERS + 1) as pool:
        follower = pool.submit(follow)
        writes = [item for batch in pool.map(writer_thread, range(WRITERS)) for item in batch]
        done.set()
        follower.result(timeout=60)
    assert len(writes) == WRITERS * WRITES
    missed = set(writes) - observed
    assert not missed, f"the feed skipped {sorted(missed)}"
