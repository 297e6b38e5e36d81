"""The session inbox at scale: a page of 50 of the default inbox, for one reader, among 100,000
sessions, beside a raw-SQL baseline measured in the same run.

What is measured (`make bench`, or `.venv/bin/python bench/bench_sessions_inbox.py --help`):

a. the selector: `sessions.selectors.session_list(state="default", reader_id=..., limit=50)`,
   the first page (the inbox a client opens);
b. the API: `GET /api/v1/sessions?readerId=...&limit=50` in-process (Django's test client: the
   whole request path, auth, view, rendering, but no socket), the first page;
c. the walk: the next pages, each fetched with the previous page's `nextPageToken`;
d. the change feed: `GET /api/v1/sessions?cursor=<version>&limit=50`;
a'. the baseline: the same first page by hand, one psycopg query (attention groups by UNION
   ALL, each an index-ordered scan), rows as tuples, no Django.

Data: N sessions (default 100,000) of one tenant and project, plus N/5 of another tenant; 1%
running, 60% terminal, the rest idle; activity spread over 30 days; the reader has a read cursor
on 80% of the tenant's sessions, a quarter of them one version behind (unread again).
It then prints EXPLAIN (ANALYZE, BUFFERS) of every query the selector sends for the first
page, a walk page and a feed page, and whether any of them scans the sessions table
sequentially.

Setup: DATABASE_URL's server, else the embedded PostgreSQL under var/; a fresh database
`agentrun_bench_inbox`, migrated, filled with SQL, analysed, and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass

import psycopg
from benchlib import BenchmarkError, percentile, run_on_fresh_database

BENCH_DB = "agentrun_bench_inbox"
TENANT = PROJECT = "bench"
READER = "ana"
PAGE = 50

POPULATE = [
    "SELECT setseed(0.42)",
    """
    INSERT INTO agent_sessions_session (
        session_id, tenant_id, project_id, backend_profile, metadata, version, execution_state,
        last_event_seq, summary, title, last_activity_at, created_at, updated_at, storage_kind)
    SELECT 'sess-' || lpad(i::text, 7, '0'), %(tenant)s, %(project)s,
           (ARRAY['echo', 'codex', 'claude-code'])[1 + i %% 3],
           '{}'::jsonb, i,
           CASE WHEN i %% 100 = 0 THEN 'running' WHEN i %% 5 < 3 THEN 'terminal' ELSE 'idle' END,
           i %% 40, '{}'::jsonb, 'Session ' || i, t.activity, now() - interval '31 days', t.activity, 'none'
    FROM generate_series(1, %(count)s) AS i,
         LATERAL (SELECT now() - random() * interval '30 days' + i * interval '0 s' AS activity) t
    """,
    """
    INSERT INTO agent_sessions_session (
        session_id, tenant_id, project_id, backend_profile, metadata, version, execution_state,
        last_event_seq, summary, last_activity_at, created_at, updated_at, storage_kind)
    SELECT 'other-' || i, 'other', 'other', 'echo', '{}'::jsonb, %(count)s + i, 'idle', 0, '{}'::jsonb,
           now() - random() * interval '30 days', now(), now(), 'none'
    FROM generate_series(1, %(count)s / 5) AS i
    """,
    """
    INSERT INTO agent_sessions_sessionreadcursor (session_id, reader_id, session_version, read_at)
    SELECT session_id, %(reader)s, CASE WHEN random() < 0.25 THEN version - 1 ELSE version END, updated_at
    FROM agent_sessions_session WHERE tenant_id = %(tenant)s AND random() < 0.8
    """,
    """
    INSERT INTO agentrun_counter (name, value) SELECT 'sessions', max(version) FROM agent_sessions_session
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value
    """,
    "ANALYZE agent_sessions_session",
    "ANALYZE agent_sessions_sessionreadcursor",
]

# The first page by hand: per attention group an index-ordered scan, then the sort.
BASELINE = """
SELECT * FROM (
  (SELECT 0 AS g, s.session_id, s.version, s.execution_state, s.title, s.last_activity_at, s.updated_at,
          c.session_version, c.read_at
   FROM agent_sessions_session s
   LEFT JOIN agent_sessions_sessionreadcursor c ON c.session_id = s.session_id AND c.reader_id = %(reader)s
   WHERE s.tenant_id = %(tenant)s AND s.project_id = %(project)s AND s.execution_state = 'running'
   ORDER BY COALESCE(s.last_activity_at, s.updated_at) DESC, s.updated_at DESC, s.session_id LIMIT %(limit)s)
  UNION ALL
  (SELECT 1 AS g, s.session_id, s.version, s.execution_state, s.title, s.last_activity_at, s.updated_at,
          c.session_version, c.read_at
   FROM agent_sessions_session s
   LEFT JOIN agent_sessions_sessionreadcursor c ON c.session_id = s.session_id AND c.reader_id = %(reader)s
   WHERE s.tenant_id = %(tenant)s AND s.project_id = %(project)s AND s.execution_state <> 'running'
     AND (c.session_version IS NULL OR c.session_version < s.version)
   ORDER BY COALESCE(s.last_activity_at, s.updated_at) DESC, s.updated_at DESC, s.session_id LIMIT %(limit)s)
) page ORDER BY g, COALESCE(last_activity_at, updated_at) DESC, updated_at DESC, session_id LIMIT %(limit)s
"""


@dataclass
class Figure:
    name: str
    samples: list[float]

    def line(self, baseline: Figure | None = None) -> str:
        p50, p99 = percentile(self.samples, 50), percentile(self.samples, 99)
        text = f"{self.name:<44} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   (n={len(self.samples)})"
        if baseline is not None:
            text += f"   p50 ratio to baseline {p50 / percentile(baseline.samples, 50):.2f}"
        return text


def timed(count: int, call) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    return samples


def populate(db_url: str, count: int) -> None:
    params = {"tenant": TENANT, "project": PROJECT, "reader": READER, "count": count}
    with psycopg.connect(db_url) as conn:
        for statement in POPULATE:
            conn.execute(statement, params if "%(" in statement else None)


def baseline(db_url: str, iterations: int) -> Figure:
    params = {"tenant": TENANT, "project": PROJECT, "reader": READER, "limit": PAGE}
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(BASELINE, params).fetchall()
        if len(rows) != PAGE:
            raise BenchmarkError(f"the baseline page has {len(rows)} rows, not {PAGE}")
        return Figure("a'. raw SQL, first page", timed(iterations, lambda: conn.execute(BASELINE, params).fetchall()))


def django_figures(iterations: int) -> tuple[list[Figure], list[tuple[str, list[str]]]]:
    import django

    django.setup()
    from django.db import connection
    from django.test import Client

    from agentrun.auth import Scope, api_key_create
    from sessions import selectors

    scope = Scope(tenant_id=TENANT, project_id=PROJECT)
    _, raw = api_key_create(tenant_id=TENANT, project_id=PROJECT, role="client", name="bench")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")

    def api(**params):
        response = client.get("/api/v1/sessions", {"readerId": READER, "limit": PAGE, **params})
        if response.status_code != 200:
            raise BenchmarkError(f"GET /api/v1/sessions answered {response.status_code}: {response.content[:300]}")
        return response.json()

    first = api()
    if first["count"] != PAGE or not first["nextPageToken"]:
        raise BenchmarkError("the first page is not full")
    tokens, token = [], first["nextPageToken"]
    for _ in range(20):
        tokens.append(token)
        token = api(pageToken=token)["nextPageToken"]
    feed_cursor = str(int(first["cursor"]) - 5_000)

    figures = [
        Figure(
            "a. selector, first page",
            timed(iterations, lambda: selectors.session_list(scope=scope, reader_id=READER, limit=PAGE)),
        ),
        Figure("b. API, first page", timed(iterations, api)),
        Figure(
            "c. API, walk pages 2-21 (pageToken)",
            [
                sample
                for _ in range(max(1, iterations // 20))
                for token in tokens
                for sample in timed(1, lambda token=token: api(pageToken=token))
            ],
        ),
        Figure("d. API, change feed page (cursor)", timed(iterations, lambda: api(cursor=feed_cursor))),
    ]

    plans: list[tuple[str, list[str]]] = []

    def explain(label):
        def wrapper(execute, sql, params, many, context):
            if not isinstance(sql, str):  # a psycopg.sql statement: its text, for the EXPLAIN
                sql = sql.as_string(context["connection"].connection)
            if sql.lstrip().upper().startswith(("SELECT", "(SELECT")):
                cursor = context["cursor"]
                execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params, many, context)
                plans.append((label, [row[0] for row in cursor.fetchall()]))
            return execute(sql, params, many, context)

        return wrapper

    for label, call in (
        ("first page", lambda: selectors.session_list(scope=scope, reader_id=READER, limit=PAGE)),
        ("walk page", lambda: selectors.session_list(scope=scope, reader_id=READER, limit=PAGE, page_token=tokens[5])),
        (
            "feed page",
            lambda: selectors.session_list(scope=scope, reader_id=READER, limit=PAGE, cursor=int(feed_cursor)),
        ),
    ):
        with connection.execute_wrapper(explain(label)):
            call()
    return figures, plans


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions of the measured tenant")
    parser.add_argument("--iterations", type=int, default=200, help="samples per figure")
    parser.add_argument("--plans", action="store_true", help="print every query plan in full")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def measure(db_url: str, server: str, source: str) -> None:
        print(f"setup: {args.sessions:,} sessions ...", flush=True)
        populate(db_url, args.sessions)
        os.environ.update(
            DATABASE_URL=db_url,
            DJANGO_SETTINGS_MODULE="settings.prod",
            DJANGO_SECRET_KEY=uuid.uuid4().hex,
            DJANGO_ALLOWED_HOSTS="*",
        )
        raw = baseline(db_url, args.iterations)
        figures, plans = django_figures(args.iterations)
        print(
            f"\ndefault inbox, reader {READER!r}, pages of {PAGE}, {args.sessions:,} sessions "
            f"(+{args.sessions // 5:,} of another tenant)"
        )
        print(raw.line())
        for figure in figures:
            print(figure.line(raw))
        seq_scans = [
            (label, line) for label, plan in plans for line in plan if "Seq Scan on agent_sessions_session " in line
        ]
        print(
            f"\nqueries explained: {len(plans)}; sequential scans of agent_sessions_session: "
            f"{'none' if not seq_scans else len(seq_scans)}"
        )
        for label, plan in plans:
            if args.plans or label == "first page":
                print(f"\n-- {label}\n" + "\n".join(plan))
            else:
                print(f"\n-- {label}: " + "; ".join(line.strip() for line in plan if "Index" in line or "Scan" in line))

    def close_connections() -> None:
        if "DJANGO_SETTINGS_MODULE" in os.environ and "django" in sys.modules:
            from django.db import connections

            connections.close_all()

    return run_on_fresh_database(BENCH_DB, measure, cleanup=close_connections)


if __name__ == "__main__":
    sys.exit(main())
