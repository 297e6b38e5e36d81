"""The admin in a real browser: Debian's chromium, driven by Playwright, started by the test
against a live server. It logs in, opens the dashboard, a session with its events and a run,
and checks what they show. Screenshots are kept in AGENTRUN_ARTIFACTS_DIR (default
var/artifacts/admin); `docs/admin-dashboard.png` in the README is one of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from runs import services
from sessions.models import Session
from tests.helpers import claim, make_run, make_task

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("AGENTRUN_ARTIFACTS_DIR", Path(__file__).resolve().parent.parent / "var" / "artifacts"))

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)",
    ),
]


@pytest.fixture
def browser(world):
    """Started after the data is made: Playwright's loop runs in this thread, where Django then
    refuses database calls."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def world():
    """A session with a finished turn (its events), a failed run, some pending ones."""
    run = make_run(session_id="checkout-flow")
    Session.objects.filter(pk="checkout-flow").update(title="Fix the checkout flow")
    lease = claim(run)
    services.event_append(
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=lease.lease_epoch,
        events=[
            ("assistant_message", {"text": "Looking at checkout.py"}),
            ("diff", {"path": "checkout.py", "patch": "-total = 0\n+total = sum(items)"}),
        ],
    )
    services.run_finish(run_id=run.id, runner_id="runner-1", lease_epoch=lease.lease_epoch, terminal_status="completed")
    failed = make_run()
    lease = claim(failed)
    services.run_finish(
        run_id=failed.id,
        runner_id="runner-1",
        lease_epoch=lease.lease_epoch,
        terminal_status="failed",
        failure_kind="agent-failed",
        failure_message="the agent exited 1",
    )
    for _ in range(3):
        make_run()
    for title in ("Upgrade the ORM", "Triage flaky tests"):
        make_task("maintenance", title=title)
    get_user_model().objects.create_superuser("ops", "ops@example.com", "correct horse battery")
    return {"run": run, "failed": failed}


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_an_operator_logs_in_and_reads_the_dashboard_a_session_and_a_run(live_server, world, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{live_server.url}/admin/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", "ops")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")
    page.wait_for_selector("text=Dashboard")

    page.click("text=Dashboard")
    page.wait_for_url("**/admin/dashboard/")
    assert page.inner_text("td.hour-pending") == "3"
    assert "maintenance" in page.inner_text("#content")
    assert page.inner_text("td.day-completed") == "1" and page.inner_text("td.day-failed") == "1"
    assert "agent-failed" in page.content()
    dashboard = shot(page, "admin-dashboard")

    page.goto(f"{live_server.url}/admin/agent_sessions/session/")
    page.click("text=checkout-flow")
    text = page.inner_text("#content")
    assert "Fix the checkout flow" in text
    assert "Looking at checkout.py" in text and "assistant_message" in text
    shot(page, "admin-session")

    page.locator("a", has_text=world["run"].id).first.click()
    page.wait_for_url("**/admin/runs/run/**")
    text = page.inner_text("#content")
    assert "completed" in text and "terminal_status" in text
    # The diff's payload is pretty-printed in a block the operator can fold.
    details = page.locator("details.agentrun-json", has_text="sum(items)").first
    assert details.is_visible()
    assert '"path": "checkout.py"' in details.inner_text()
    shot(page, "admin-run")

    page.goto(f"{live_server.url}/admin/runs/run/?failure_kind=agent-failed")
    assert world["failed"].id in page.inner_text("#result_list")
    assert dashboard.stat().st_size > 10_000
    docs = Path(__file__).resolve().parent.parent / "docs" / "admin-dashboard.png"
    if os.environ.get("AGENTRUN_UPDATE_DOCS"):
        shutil.copyfile(dashboard, docs)
    assert docs.exists(), "docs/admin-dashboard.png is missing: AGENTRUN_UPDATE_DOCS=1 makes it"
