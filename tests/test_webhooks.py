"""Webhooks: written in the transaction that ends a run or queue task, delivered by the worker to
a real HTTP receiver (pytest-httpserver) that checks the signature; retried with backoff until
it gets through; given up after the limit and resent from admin; URLs checked when given and
where they resolve before each try."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from werkzeug import Request, Response

from agentrun import webhooks
from agentrun.models import DeliveryState, WebhookDelivery
from queues import services as queue_services
from runs import services
from tests.helpers import TENANT, claim, in_threads, make_key, make_run, make_task

pytestmark = pytest.mark.django_db


class Receiver:
    """A webhook receiver as a user would write one: it checks the signature and the timestamp,
    and answers `failures` 500s before it takes one."""

    def __init__(self, httpserver, *, failures: int = 0, path: str = "/hook"):
        self.server, self.path = httpserver, path
        self.failures = failures
        self.secret = webhooks.tenant_secret(TENANT)  # what the tenant's operator gave the receiver
        self.received: list[dict] = []
        self.lock = threading.Lock()
        httpserver.expect_request(path, method="POST").respond_with_handler(self.handle)

    @property
    def url(self) -> str:
        return self.server.url_for(self.path)

    def handle(self, request: Request) -> Response:
        body = request.get_data()
        good = webhooks.verify(
            self.secret,
            body=body,
            timestamp=request.headers.get(webhooks.TIMESTAMP_HEADER, ""),
            signature=request.headers.get(webhooks.SIGNATURE_HEADER, ""),
        )
        with self.lock:
            self.received.append(
                {"good": good, "body": body, "delivery": request.headers.get(webhooks.DELIVERY_HEADER)}
            )
            if not good:
                return Response("bad signature", status=401)
            if self.failures > 0:
                self.failures -= 1
                return Response("not now", status=500)
        return Response("ok", status=200)


@pytest.fixture
def fast(settings):
    settings.AGENTRUN_WEBHOOK_BACKOFF_SECONDS = 0
    settings.AGENTRUN_WEBHOOK_MAX_ATTEMPTS = 5
    return settings


def deliver_until_settled(tries: int = 10) -> list:
    sent = []
    for _ in range(tries):
        sent += webhooks.deliver_due()
        if not WebhookDelivery.objects.filter(state=DeliveryState.PENDING).exists():
            break
    return sent


def test_a_webhook_arrives_signed_when_a_run_ends(httpserver, fast):
    receiver = Receiver(httpserver)
    client, runner = make_key("client"), make_key("runner")
    status, run = client.post("runs", {"backendProfile": "echo", "webhookUrl": receiver.url})
    assert status == 201 and run["webhookUrl"] == receiver.url
    assert not WebhookDelivery.objects.exists()  # nothing until it ends
    runner.post(f"runs/{run['id']}/claim", {"runnerId": "r1"})
    status, _ = runner.post(
        f"runs/{run['id']}/finish", {"runnerId": "r1", "leaseEpoch": 1, "terminalStatus": "completed"}
    )
    assert status == 200
    [delivery] = WebhookDelivery.objects.all()
    assert (delivery.state, delivery.run_id, delivery.event_type) == ("pending", run["id"], webhooks.RUN_ENDED)
    [sent] = webhooks.deliver_due()
    assert sent.outcome == "delivered"
    [got] = receiver.received
    assert got["good"] and got["delivery"] == delivery.id
    body = json.loads(got["body"])
    assert body["type"] == "run.ended" and body["id"] == delivery.id
    assert body["data"] | {"status": "completed"} == body["data"]
    assert (body["data"]["runId"], body["data"]["terminalStatus"]) == (run["id"], "completed")
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
    assert webhooks.deliver_due() == []  # delivered once


def test_a_receiver_that_fails_three_times_gets_it_on_the_fourth_try(httpserver, fast):
    receiver = Receiver(httpserver, failures=3)
    run = make_run(webhook_url=receiver.url)
    services.run_cancel(run_id=run.id, reason="no longer needed")
    outcomes = [item.outcome for item in deliver_until_settled()]
    assert outcomes == ["retry", "retry", "retry", "delivered"]
    assert len(receiver.received) == 4 and all(item["good"] for item in receiver.received)
    # The same document each time, signed anew: one delivery id, one body.
    assert len({item["delivery"] for item in receiver.received}) == 1
    assert len({item["body"] for item in receiver.received}) == 1
    delivery = WebhookDelivery.objects.get()
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("delivered", 4, None)


def test_it_gives_up_after_the_limit_and_an_operator_resends_it(httpserver, fast, staff):
    fast.AGENTRUN_WEBHOOK_MAX_ATTEMPTS = 2
    receiver = Receiver(httpserver, failures=2)
    run = make_run(webhook_url=receiver.url)
    services.run_cancel(run_id=run.id)
    assert [item.outcome for item in deliver_until_settled()] == ["retry", "failed"]
    delivery = WebhookDelivery.objects.get()
    assert delivery.state == "failed" and "500" in delivery.last_error
    page = staff.get(f"/admin/agentrun/webhookdelivery/{delivery.pk}/change/").content.decode()
    assert run.id in page and "the receiver answered 500" in page
    response = staff.post(
        "/admin/agentrun/webhookdelivery/", {"action": "resend", "_selected_action": [delivery.pk]}, follow=True
    )
    assert response.status_code == 200
    assert WebhookDelivery.objects.get().state == "pending"
    assert [item.outcome for item in deliver_until_settled()] == ["delivered"]


def test_nothing_is_sent_for_an_end_that_rolled_back(httpserver):
    run = make_run(webhook_url="https://hooks.example.com/x")
    with pytest.raises(RuntimeError), transaction.atomic():
        services.run_cancel_in_transaction(run_id=run.id)
        assert WebhookDelivery.objects.count() == 1
        raise RuntimeError("the transaction fails")
    assert not WebhookDelivery.objects.exists()


def test_a_run_without_a_webhook_writes_no_delivery():
    services.run_cancel(run_id=make_run().id)
    assert not WebhookDelivery.objects.exists()


def test_a_queue_task_that_ends_sends_its_webhook(httpserver, fast):
    receiver = Receiver(httpserver)
    client = make_key("client")
    status, task = client.post(
        "queue-tasks", {"queue": "q", "backendProfile": "echo", "title": "t", "webhookUrl": receiver.url}
    )
    assert status == 201 and task["webhookUrl"] == receiver.url
    queue_services.task_cancel(task_id=task["id"], reason="dropped")
    [sent] = webhooks.deliver_due()
    assert sent.outcome == "delivered"
    body = json.loads(receiver.received[0]["body"])
    assert body["type"] == "queue-task.ended"
    assert (body["data"]["taskId"], body["data"]["state"], body["data"]["cancelReason"]) == (
        task["id"],
        "cancelled",
        "dropped",
    )


def test_the_run_a_task_starts_does_not_inherit_the_task_s_webhook():
    from queues.dispatcher import Dispatcher

    make_task("hooks", webhook_url="https://hooks.example.com/task")
    Dispatcher().run_once()
    from runs.models import Run

    assert all(run.webhook_url is None for run in Run.objects.all())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/x", "http or https"),
        ("hooks.example.com/x", "http or https"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("http://127.0.0.1:8080/x", "private or loopback"),
        ("http://10.1.2.3/x", "private or loopback"),
        ("http://[::1]/x", "private or loopback"),
        ("http://169.254.169.254/latest/meta-data", "private or loopback"),
        ("http://localhost/x", "private or loopback"),
        ("http://[::ffff:192.168.0.1]/x", "private or loopback"),
        ("https://hooks.example.com/" + "x" * 2100, "2048"),
        ("http://hooks.example.com:99999/x", "not a URL"),
        (12, "string"),
    ],
)
def test_webhook_urls_are_checked_when_given(settings, url, why):
    settings.AGENTRUN_WEBHOOK_ALLOW_PRIVATE = False
    client = make_key("client")
    for route, body in (
        ("runs", {"backendProfile": "echo"}),
        ("queue-tasks", {"queue": "q", "backendProfile": "echo", "title": "t"}),
    ):
        status, answer = client.post(route, {**body, "webhookUrl": url})
        assert status == 400, answer
        assert answer["error"]["kind"] == "schema-invalid"
        assert why in json.dumps(answer["error"]["details"]), answer
    from queues.models import QueueTask
    from runs.models import Run

    assert not Run.objects.exists() and not QueueTask.objects.exists()


def test_a_public_url_is_taken_and_an_empty_one_means_none(settings):
    settings.AGENTRUN_WEBHOOK_ALLOW_PRIVATE = False
    client = make_key("client")
    status, run = client.post("runs", {"backendProfile": "echo", "webhookUrl": "https://hooks.example.com/a?b=1"})
    assert status == 201 and run["webhookUrl"] == "https://hooks.example.com/a?b=1"
    status, run = client.post("runs", {"backendProfile": "echo", "webhookUrl": ""})
    assert status == 201 and run["webhookUrl"] is None


def test_a_name_that_resolves_to_a_private_address_is_refused_at_each_try(httpserver, fast):
    receiver = Receiver(httpserver)
    run = make_run(webhook_url=receiver.url.replace("127.0.0.1", "localhost").replace("[::1]", "localhost"))
    services.run_cancel(run_id=run.id)
    fast.AGENTRUN_WEBHOOK_ALLOW_PRIVATE = False
    [sent] = webhooks.deliver_due()
    assert sent.outcome == "retry" and "private or loopback" in sent.error
    assert receiver.received == []


def test_a_receiver_that_does_not_answer_in_time_is_a_failed_try(httpserver, fast):
    fast.AGENTRUN_WEBHOOK_TIMEOUT_SECONDS = 0.2

    def slow(_request):
        time.sleep(1)
        return Response("late")

    httpserver.expect_request("/slow", method="POST").respond_with_handler(slow)
    run = make_run(webhook_url=httpserver.url_for("/slow"))
    services.run_cancel(run_id=run.id)
    [sent] = webhooks.deliver_due()
    assert sent.outcome == "retry" and "Timeout" in sent.error


@pytest.mark.django_db(transaction=True)
def test_two_workers_never_send_one_delivery_twice(httpserver, fast):
    receiver = Receiver(httpserver)
    for _ in range(12):
        services.run_cancel(run_id=make_run(webhook_url=receiver.url).id)

    def work(_index):
        try:
            return [item.delivery_id for item in webhooks.deliver_due(limit=5)] + [
                item.delivery_id for item in webhooks.deliver_due(limit=5)
            ]
        finally:
            connection.close()

    sent = [delivery for batch in in_threads(3, work) for delivery in batch]
    # Three workers took up to 30 between them: each of the 12 went once, to one of them.
    assert len(sent) == len(set(sent)) == 12
    ids = [item["delivery"] for item in receiver.received]
    assert len(ids) == len(set(ids)) == 12
    assert not WebhookDelivery.objects.exclude(state=DeliveryState.DELIVERED).exists()


def test_backoff_doubles_with_jitter_up_to_the_cap(settings):
    settings.AGENTRUN_WEBHOOK_BACKOFF_SECONDS = 10
    settings.AGENTRUN_WEBHOOK_BACKOFF_MAX_SECONDS = 300
    for attempts, full in ((1, 10), (2, 20), (3, 40), (6, 300), (20, 300)):
        delays = [webhooks.backoff_seconds(attempts) for _ in range(200)]
        assert all(full / 2 <= delay <= full for delay in delays)
        assert len(set(delays)) > 100  # jittered


def test_verify_refuses_replays_and_tampering():
    secret, body, now = "whsec_test", b'{"a":1}', 1_800_000_000
    signature = webhooks.sign(secret, now, body)
    assert webhooks.verify(secret, body=body, timestamp=str(now), signature=signature, now=now + 10)
    assert not webhooks.verify(secret, body=body, timestamp=str(now), signature=signature, now=now + 301)
    assert not webhooks.verify(secret, body=b'{"a":2}', timestamp=str(now), signature=signature, now=now)
    assert not webhooks.verify("other", body=body, timestamp=str(now), signature=signature, now=now)
    assert not webhooks.verify(secret, body=body, timestamp="soon", signature=signature, now=now)


def test_the_secret_command_prints_and_rotates(httpserver, fast):
    out = io.StringIO()
    call_command("webhook_secret", "--tenant", TENANT, stdout=out)
    first = out.getvalue().strip()
    assert first.startswith("whsec_") and first == webhooks.tenant_secret(TENANT)
    out = io.StringIO()
    call_command("webhook_secret", "--tenant", TENANT, "--rotate", stdout=out)
    second = out.getvalue().strip()
    assert second != first and webhooks.tenant_secret(TENANT) == second
    receiver = Receiver(httpserver)  # it verifies with the tenant's secret now: the new one
    services.run_cancel(run_id=make_run(webhook_url=receiver.url).id)
    webhooks.deliver_due()
    assert receiver.received[0]["good"]
    assert not webhooks.verify(
        first, body=receiver.received[0]["body"], timestamp=str(int(time.time())), signature="sha256=00"
    )


def test_the_worker_s_pass_delivers(httpserver, fast):
    receiver = Receiver(httpserver)
    run = make_run(webhook_url=receiver.url)
    claim(run)
    services.run_cancel(run_id=run.id)
    out = io.StringIO()
    call_command("worker", "--once", "--gc-interval", "0", stdout=out)
    assert "sent 1 webhook(s)" in out.getvalue()
    assert len(receiver.received) == 1
