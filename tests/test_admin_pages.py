"""The operators' dashboard: staff only, linked from the index, and its figures."""

from __future__ import annotations

import pytest
from django.test import Client

from runs.models import Run
from tests.helpers import make_run

pytestmark = pytest.mark.django_db


def test_dashboard_is_staff_only_and_linked_from_the_index(staff):
    assert Client().get("/admin/dashboard/").status_code == 302
    assert "/admin/dashboard/" in staff.get("/admin/").content.decode()
    assert staff.get("/admin/dashboard/").status_code == 200


def test_dashboard_counts_runs_by_status_and_failures_by_kind(staff):
    for _ in range(3):
        make_run()
    failed = make_run()
    Run.objects.filter(pk=failed.pk).update(status="failed", failure_kind="oom_killed")
    body = staff.get("/admin/dashboard/").content.decode()
    assert '<td class="hour-pending">3</td>' in body and '<td class="day-failed">1</td>' in body
    assert "oom_killed" in body and "failure_kind=oom_killed" in body and failed.id in body
