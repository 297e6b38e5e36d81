"""/metrics as deployed: gunicorn with two worker processes, whichever answers the scrape sums
both (prometheus-client's multiprocess mode, set up by gunicorn.conf.py); open streams and
long-polls count while they wait and stop counting when they end; the pool reports its size."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentrun.auth import api_key_create
from runs import services
from tests.helpers import PROJECT, TENANT, gunicorn, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, tmp_path_factory):
    with django_db_blocker.unblock(), gunicorn(tmp_path_factory.mktemp("metrics"), workers=2, threads=4) as url:
        yield url


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def health_requests(samples) -> float:
    labels = (("method", "GET"), ("route", "/api/v1/health"), ("status", "200"))
    return samples.get(("agentrun_http_requests_total", labels), 0.0)


def test_requests_are_summed_over_every_worker_process(server):
    before = health_requests(scrape(server))
    for _ in range(40):  # a new connection each: both workers answer some
        with httpx.Client(timeout=10) as client:
            client.get(f"{server}/api/v1/health")
    after = scrape(server)
    # Each scrape counts the 40 health checks once, whichever worker answers it; in single-process
    # mode each worker would show only its own share.
    assert health_requests(after) - before == 40
    pool = after.get(("agentrun_db_pool_connections", (("state", "size"),)), 0.0)
    assert pool >= 1


def test_open_streams_and_long_polls_are_counted_while_they_wait(server):
    client_key = api_key_create(tenant_id=TENANT, project_id=PROJECT, role="client")[1]
    run = services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")[0]
    headers = {"Authorization": f"Bearer {client_key}"}
    started, stop = threading.Event(), threading.Event()

    def follow():
        with (
            httpx.Client(base_url=f"{server}/api/v1/", headers=headers, timeout=30) as api,
            api.stream("GET", f"runs/{run.id}/events/stream") as response,
        ):
            assert response.status_code == 200
            for _ in response.iter_raw():
                started.set()
                if stop.is_set():
                    return

    def streams_open() -> float:
        return scrape(server).get(("agentrun_streams_open", ()), 0.0)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert started.wait(10)
    assert wait_for(lambda: streams_open() == 1, 10)

    def long_polls() -> float:
        return scrape(server).get(("agentrun_long_polls_waiting", ()), 0.0)

    def poll():
        with httpx.Client(base_url=f"{server}/api/v1/", headers=headers, timeout=30) as api:
            return api.get(
                f"runs/{run.id}/events", params={"afterSeq": str(run.last_event_seq), "wait": "20"}
            ).status_code

    polls = [threading.Thread(target=poll, daemon=True) for _ in range(3)]
    for thread in polls:
        thread.start()
    assert wait_for(lambda: long_polls() == 3, 10)
    stop.set()
    services.run_cancel(run_id=run.id)  # the run ends (an event): the stream ends, the polls answer
    reader.join(10)
    assert not reader.is_alive()
    assert wait_for(lambda: streams_open() == 0, 10)
    for thread in polls:
        thread.join(25)
    assert wait_for(lambda: long_polls() == 0, 10)
